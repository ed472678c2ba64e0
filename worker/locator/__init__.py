"""The L3 locator (Belharbi et al. 2017): sliding-window CNN over the frontal MIP.

Entry point: :func:`worker.locator.locate.locate_l3` (first stage, then the refinement
stage). Modules, each importing only those listed before it (no circle):

* ``model``: the networks (the paper's CNN4, a VGG16-layout backbone);
* ``windows``: window geometry (:class:`~worker.locator.windows.WindowSpec`), HU
  normalisation, the body-centred strip, sliding windows;
* ``decision``: the slope -1 correlation decision (section 3.3, Fig. 6), numpy only;
* ``weights``: the weights file (network + window geometry + training record), loading,
  device;
* ``coarse``: the first stage over the whole MIP and the in-field-of-view decision;
* ``fine``: the 1 mm refinement stage around the first answer;
* ``locate``: both stages on one volume, :class:`~worker.locator.locate.L3Location`.

This package file imports nothing, so importing one module does not load the others.
"""
