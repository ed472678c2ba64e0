"""l3spot research: what only development needs (evaluation against phantoms and the real
references, experiment scripts). Not in the runtime image; its extra dependencies install
with ``pip install -e ".[research]"``. The node and the workers never import it.
"""
