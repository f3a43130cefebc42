"""Shared set-up of the stage-1 tools: run config, mesh and the selected checkpoint."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def load_model(workdir: str, label_space_of_data: str | None = None):
    """(config, mesh, rules, model, variables, class_names, checkpoint description)."""
    from wamglm_jax.data import labels as L
    from wamglm_jax.parallel import sharding as shd
    from wamglm_jax.parallel.mesh import make_mesh
    from wamglm_jax.train import stage1

    config = stage1.load_run_config(workdir)
    label_space = config.data.label_space
    if label_space_of_data is not None and label_space_of_data != label_space:
        raise ValueError(f"the data is labelled in {label_space_of_data!r} but the model in "
                         f"{workdir} was trained on {label_space!r}")
    class_names = list(L.class_names(label_space))
    mesh = make_mesh(config.mesh)
    rules = shd.rules_from_config(config)
    model, variables, source = stage1.load_variables(workdir, config, mesh, len(class_names),
                                                     rules)
    return config, mesh, rules, model, variables, class_names, source
