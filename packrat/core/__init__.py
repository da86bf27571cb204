"""The pure core: profiles, the optimizer's DP, served plans, the estimator of B, the switch
policy, the drain rule and the controller's decisions. Data in, data out: no I/O beyond
reading and writing profile files, no clock, no HTTP, no torch."""
