"""Composer on a Ray cluster: the Ray implementation of composer.tensor_jobs.TensorExecutor.

Ray is imported only here and only when a build or sweep asks for it (``--ray``), so local
builds never import it. See docs/ray.md.
"""
