"""The controller's decisions as pure functions, shared by the controller and the workers:
recompute ratios (`ratio`), what crosses the wire (`policy`), calibration files (`calibration`)."""
