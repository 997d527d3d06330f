"""Linear merge of N Hugging Face checkpoints (Fathom-R1-14B's last step), no accelerator needed.

    python -m polaris_jax.main --config=configs/merge.py --workdir=/tmp/merge \
        --config.inputs='("/runs/a/export/hf", "/runs/b/export/hf")' --config.weights='(0.5, 0.5)'

The same as `python -m polaris_jax.tools.merge --inputs=A,B --weights=0.5,0.5 --output=DIR`.
The merged model is written to config.output, or WORKDIR/merged when that is empty.
"""

import ml_collections


def get_config(arg: str | None = None):
    del arg
    c = ml_collections.ConfigDict()
    c.job = "merge"
    c.inputs = ("",)  # Hugging Face checkpoint directories
    c.weights = (1.0,)  # one per input
    c.normalize = True  # divide the weights by their sum (mergekit's linear default)
    c.overwrite = False
    c.output = ""  # "" = WORKDIR/merged
    return c.lock()
