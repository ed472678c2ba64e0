"""l3spot core: the shared kernel that both the node (:mod:`service`) and the workers import.

Typed configuration (:mod:`.config`), one error tree (:mod:`.errors`), job records and their
states (:mod:`.jobs`), the queue contract and the only place that sends Celery tasks
(:mod:`.queue`), the result-folder layout and record (:mod:`.layout`, :mod:`.result`),
structured logs (:mod:`.logs`) and the tissue labels (:mod:`.labels`). Nothing here imports
torch, :mod:`service`, :mod:`worker` or :mod:`research`.
"""

__version__ = "0.1.0"
ALGORITHM_NAME = "l3spot"
