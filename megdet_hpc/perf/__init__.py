"""Performance modelling: the time-to-train cost model and its calibration on real collectives."""
