"""composer package."""
