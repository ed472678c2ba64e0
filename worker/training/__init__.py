"""Training on phantoms and on a site's annotated scans (a product feature: ``l3spot train``)."""
