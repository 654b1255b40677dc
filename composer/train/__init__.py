"""Drivers of router_train's maths: owner expert training (`composer expert train`) and router
tuning inside a build. They read files, choose the precision and write artifacts; the tensor work
is in router_train/."""
