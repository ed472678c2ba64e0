"""Body composition on the L3 slice: SMA, IMAT, VAT, SAT.

``measure`` (measurements, SMI, cut-offs, QA, the segmenter dispatch), ``classical`` (the
classical method's named steps over a ``state.SliceState``: ``body``, ``wall``,
``vertebra``, ``psoas``, ``bowel``), ``morphology`` (exact fast disk morphology), ``hu`` (HU
ranges, noise), ``unet`` (the 2-D U-Net). Parameters: ``core.composition_params``.
"""
