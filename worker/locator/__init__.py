"""The L3 locator (Belharbi et al. 2017): sliding-window CNN over the frontal MIP."""
