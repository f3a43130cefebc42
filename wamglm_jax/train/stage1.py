"""Stage 1: PSCL visual fine-tuning of the ViT (classifier + prototypes), then evaluation.

    run(config, workdir, mesh) -> report dict; writes workdir/stage1/{checkpoints,best,logs,
    report.json, report.md, confusion_<split>.png, embedding_<split>.png, config.json}

Steps: load_splits(config.data) -> grain loader of 3 views (balanced sampling per
config.data.balanced_sampling) -> Stage1Model, sharded init -> train_loop with
loss = CE(view 1, optional class weights) + pscl_weight * BalSCL(views 2, 3) -> model selection
on `val` only (config.stage1.loop.select_metric, evaluated every eval_every steps) -> the best
params are evaluated on `val` and, when the data has one, on `test` (each labelled by split in
the report; the top-level accuracy/macro_f1/per_class are those of config.stage1.report_split,
falling back to `val`). Re-running a finished workdir returns the existing report.

config.stage1 fields: see `default_stage1_config`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from wamglm_jax.data.pipeline import image_loader
from wamglm_jax.data.splits import load_splits
from wamglm_jax.evaluate import plots
from wamglm_jax.evaluate.classification import classification_metrics, write_report
from wamglm_jax.losses.pscl import stage1_loss
from wamglm_jax.models.stage1 import Stage1Model, apply_views
from wamglm_jax.parallel import sharding as shd
from wamglm_jax.train import checkpoint as ckpt
from wamglm_jax.train import loop, optim
from wamglm_jax.train.state import TrainState

STAGE = "stage1"


def default_stage1_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        batch_size=64,              # global batch (all processes), x3 views
        eval_batch_size=256,
        pscl_weight=0.35,           # 0 = ablation (CE only)
        temperature=0.08,
        ce_all_views=False,         # CE averaged over the 3 views (reference: view 1 only)
        label_smoothing=0.0,        # CE target (1 - eps) one_hot + eps / C (reference: 0)
        proj_dim=256,
        pooling="mean",             # pooled ViT feature for the head: mean | mean_max
        class_weighting="none",     # CE class weights from train counts: none | sqrt | full
        tta=False,                  # final evaluation: average softmax over the 8 dihedral views
                                    # (model selection during training never uses TTA)
        loader_workers=0,           # grain worker processes of the train and eval loaders
                                    # (0 = in-process)
        report_split="test",        # top-level metrics of the report (falls back to val)
        embedding_method="pca",     # pca | tsne (feature plot with prototypes)
        embedding_points=2000,
        loop=loop.default_loop_config(num_steps=600, log_every=50, checkpoint_every=200,
                                      eval_every=200, select_metric="val_macro_f1"),
        optimizer=optim.default_optimizer_config(learning_rate=1e-3, weight_decay=0.05),
    ))
    c.update(overrides)
    return c


def _stage_cfg(config) -> ml_collections.ConfigDict:
    """config.stage1 on top of the defaults (nested sections merged field by field)."""
    base = loop.merge_section(config, "stage1", default_stage1_config())
    if base.class_weighting not in ("none", "sqrt", "full"):
        raise ValueError(f"config.stage1.class_weighting={base.class_weighting!r}: expected "
                         "'none', 'sqrt' or 'full'")
    return base


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> Optional[np.ndarray]:
    """CE weights float[C] (mean 1 over present classes) from the train label counts."""
    if mode == "none":
        return None
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    w = np.ones(num_classes)
    present = counts > 0
    w[present] = 1.0 / (counts[present] if mode == "full" else np.sqrt(counts[present]))
    w[present] /= w[present].mean()
    return w.astype(np.float32)


# ---------------------------------------------------------------------------- model / state
def build_model(config, num_classes: int, s1=None) -> Stage1Model:
    s1 = s1 or _stage_cfg(config)
    return Stage1Model(config=config.model, num_classes=num_classes, proj_dim=s1.proj_dim,
                       pooling=s1.pooling)


def init_state(config, model, mesh, s1, rules):
    """Sharded TrainState and the lr schedule."""
    s = config.model.vit.image_size
    n = shd.axis_size(mesh, shd.BATCH_AXES)
    dummy = jnp.zeros((n, s, s, 3), jnp.float32)
    rng = jax.random.PRNGKey(int(config.seed))
    init_rng, state_rng = jax.random.split(rng)
    variables, _ = shd.init_sharded(model, init_rng, dummy, mesh=mesh, rules=rules, train=False)
    tx, schedule = optim.make_optimizer(s1.optimizer, s1.loop.num_steps, variables["params"])
    with shd.activate(mesh, rules):
        state = jax.jit(lambda v, r: TrainState.create(
            params=v["params"], batch_stats=v.get("batch_stats", {}), tx=tx, rng=r))(
                variables, state_rng)
    return state, schedule


def make_train_step(model, s1, cw):
    weights = None if cw is None else jnp.asarray(cw)

    def train_step(state: TrainState, batch):
        def loss_fn(params):
            # 'dropout': stochastic depth (config.model.vit.drop_path_rate), per step.
            outs, new_bs = apply_views(model, {"params": params, "batch_stats": state.batch_stats},
                                       batch["views"], train=True,
                                       rngs={"dropout": state.step_rng()})
            loss, aux = stage1_loss(outs[0], outs[1], outs[2], batch["label"],
                                    pscl_weight=s1.pscl_weight, temperature=s1.temperature,
                                    class_weights=weights,
                                    ce_all_views=bool(s1.ce_all_views),
                                    label_smoothing=float(s1.label_smoothing))
            return loss, (aux, new_bs)
        (loss, (aux, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads, batch_stats=new_bs)
        return state, dict(loss=loss, grad_norm=optax.global_norm(grads), **aux)
    return train_step


# ---------------------------------------------------------------------------- prediction
def _dihedral_batch(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """float[B,S,S,C]: left-right flip (optional) then k*90-degree rotation, per image."""
    x = x[:, :, ::-1] if flip else x
    return np.ascontiguousarray(np.rot90(x, k, axes=(1, 2)))


DIHEDRAL = [(k, f) for f in (False, True) for k in range(4)]


_EVAL_FNS: dict = {}


def _eval_fn(model, mesh):
    key = (id(model), id(mesh))
    if key not in _EVAL_FNS:
        _EVAL_FNS[key] = (model, mesh, _make_eval_fn(model, mesh))   # keeps model/mesh alive
    return _EVAL_FNS[key][2]


def _make_eval_fn(model, mesh):
    def f(variables, images):
        out = model.apply(variables, images, train=False)
        return jax.nn.softmax(out["logits"], -1), out["z"], out["prototypes"]
    rep = shd.replicated(mesh)
    return jax.jit(f, in_shardings=(None, shd.data_sharding(mesh)), out_shardings=(rep, rep, rep))


def predict(model, variables, dataset, *, image_size: int, batch_size: int, mesh,
            rules=(), tta: bool = False, worker_count: int = 0) -> dict:
    """Class probabilities for every map of `dataset` (in order).

    Returns {'probs' float[N,C], 'z' float[N,P] (identity view), 'prototypes' float[C,P],
    'labels' int[N], 'index' int[N]}. Every process reads the whole set in order and feeds
    its slice of each global batch (padded to a multiple of the batch devices), so the
    jitted forward is data-parallel on any mesh; outputs are replicated. `worker_count`:
    grain processes that resize the maps (the order of the output does not depend on it).
    """
    ndev = shd.axis_size(mesh, shd.BATCH_AXES)
    gb = max(ndev, (batch_size // ndev) * ndev)
    nproc, pid = jax.process_count(), jax.process_index()
    import grain.python as gp
    loader = image_loader(dataset, image_size=image_size, batch_size=gb, train=False,
                          shard_options=gp.NoSharding(), worker_count=int(worker_count))
    fn = _eval_fn(model, mesh)
    probs, zs, labels, index, protos = [], [], [], [], None
    with shd.activate(mesh, rules):
        for batch in loader:
            n = len(batch["label"])
            img = batch["image"]
            if n < gb:
                img = np.concatenate([img, np.zeros((gb - n,) + img.shape[1:], img.dtype)])
            views = DIHEDRAL if tta else DIHEDRAL[:1]
            p_sum, z0 = 0.0, None
            for k, flip in views:
                x = _dihedral_batch(img, k, flip)
                local = x[pid * gb // nproc:(pid + 1) * gb // nproc]
                p, z, protos = fn(variables, shd.global_batch(local, mesh))
                p_sum = p_sum + np.asarray(p)
                if z0 is None:
                    z0 = np.asarray(z)
            probs.append((p_sum / len(views))[:n])
            zs.append(z0[:n])
            labels.append(np.asarray(batch["label"]))
            index.append(np.asarray(batch["index"]))
    index = np.concatenate(index)
    order = _dataset_order(index, len(dataset))
    return dict(probs=np.concatenate(probs)[order], z=np.concatenate(zs)[order],
                prototypes=np.asarray(protos), labels=np.concatenate(labels)[order],
                index=index[order])


def _dataset_order(index: np.ndarray, n: int) -> np.ndarray:
    """The permutation that puts `index` in dataset order. grain workers batch their own share
    of the records (worker w: records w, w+W, ...), so batches arrive interleaved; every
    position 0..n-1 must have come back exactly once."""
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(n)):
        missing = np.setdiff1d(np.arange(n), index)
        values, counts = np.unique(index, return_counts=True)
        raise RuntimeError(
            f"predict: the loader returned {len(index)} records for a dataset of {n}; missing "
            f"positions {missing[:8].tolist()}, repeated {values[counts > 1][:8].tolist()}, "
            f"out of range {index[(index < 0) | (index >= n)][:8].tolist()}")
    return order


def evaluate_split(model, variables, dataset, class_names, *, image_size, batch_size, mesh,
                   rules=(), tta=False, out_dir=None, split="val", embedding=None,
                   embedding_points=2000, pred=None, worker_count=0):
    """Metrics (classification_metrics) of one split; with out_dir, writes
    confusion_<split>.png (and embedding_<split>.png when `embedding` is 'pca'/'tsne').
    `pred`: predictions of these very variables on `dataset` (skips the forward passes)."""
    if pred is None:
        pred = predict(model, variables, dataset, image_size=image_size, batch_size=batch_size,
                       mesh=mesh, rules=rules, tta=tta, worker_count=worker_count)
    labelled = pred["labels"] >= 0
    if not labelled.any():
        raise ValueError(f"split {split!r} has no labelled maps to evaluate")
    y, probs = pred["labels"][labelled], pred["probs"][labelled]
    metrics = classification_metrics(y, probs.argmax(-1), class_names, probs=probs)
    if out_dir is not None and jax.process_index() == 0:
        out_dir = epath.Path(out_dir)
        metrics["confusion_png"] = plots.plot_confusion_matrix(
            metrics["confusion_matrix"], class_names, os.fspath(out_dir / f"confusion_{split}.png"),
            title=f"{split}: confusion matrix (rows normalised)")
        if embedding:
            metrics["embedding_png"] = plots.plot_embedding(
                pred["z"][labelled], y, class_names, os.fspath(out_dir / f"embedding_{split}.png"),
                prototypes=pred["prototypes"], method=embedding, max_points=embedding_points,
                title=f"{split}: projected features z and class prototypes ({embedding})")
    return metrics, pred


# ---------------------------------------------------------------------------- restore helpers
def abstract_state(config, model, mesh, s1, rules) -> TrainState:
    """TrainState of ShapeDtypeStructs (replicated) for restoring without initialising."""
    s = config.model.vit.image_size
    n = shd.axis_size(mesh, shd.BATCH_AXES)
    with shd.activate(mesh, rules):
        boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((n, s, s, 3)), train=False),
                               jax.random.PRNGKey(0))
        shardings = shd.shardings_of(boxed, mesh, rules)
    variables = shd.unbox_values(boxed)   # nn.unbox would constrain abstract values under a mesh
    tx, _ = optim.make_optimizer(s1.optimizer, s1.loop.num_steps, variables["params"])
    abstract = jax.eval_shape(lambda v: TrainState.create(
        params=v["params"], batch_stats=v.get("batch_stats", {}), tx=tx,
        rng=jax.random.PRNGKey(0)), variables)
    rep = shd.replicated(mesh)
    var_abs = ckpt.abstract_like(variables, shardings)
    rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                        abstract.replace(params=None, batch_stats=None).to_checkpoint())
    return abstract.replace(**{**rest, "params": var_abs["params"],
                               "batch_stats": var_abs.get("batch_stats", {})})


def load_variables(workdir, config, mesh, num_classes: int, rules=()):
    """(model, {'params','batch_stats'}, source string) from workdir/stage1: the best
    checkpoint (selected on val) if there is one, else the latest."""
    s1 = _stage_cfg(config)
    model = build_model(config, num_classes, s1)
    stage_dir = epath.Path(workdir) / STAGE
    abstract = abstract_state(config, model, mesh, s1, rules)
    if (stage_dir / "best").exists():
        keeper = ckpt.BestKeeper(stage_dir / "best", mode=s1.loop.select_mode)
        step, score = keeper.best()
        if step is not None:
            state = keeper.restore(abstract)
            keeper.close()
            return model, {"params": state.params, "batch_stats": state.batch_stats}, \
                f"{stage_dir}/best/{step} ({s1.loop.select_metric}={score:.4f})"
        keeper.close()
    c = ckpt.Checkpointer(stage_dir / "checkpoints", save_every=0)
    step = c.latest_step()
    if step is None:
        raise FileNotFoundError(f"{stage_dir}: no stage-1 checkpoint (checkpoints/ or best/); "
                                "train first with python -m wamglm_jax.main --config=...")
    state, _ = c.restore(abstract, step)
    c.close()
    return model, {"params": state.params, "batch_stats": state.batch_stats}, \
        f"{stage_dir}/checkpoints/{step}"


def load_run_config(workdir) -> ml_collections.ConfigDict:
    """The resolved config a stage-1 run wrote (workdir/stage1/config.json or workdir/config.json)."""
    for p in (epath.Path(workdir) / STAGE / "config.json", epath.Path(workdir) / "config.json"):
        if p.exists():
            return ml_collections.ConfigDict(json.loads(p.read_text()))
    raise FileNotFoundError(f"{workdir}: no stage1/config.json or config.json (not a run dir)")


# ---------------------------------------------------------------------------- run
def run(config, workdir, mesh=None) -> dict:
    t0 = time.time()
    if os.environ.get("WAMGLM_VERBOSE_ORBAX", "0") != "1":
        loop.quiet_orbax_logs()
    s1 = _stage_cfg(config)
    rules = shd.rules_from_config(config)
    if mesh is None:
        from wamglm_jax.parallel.mesh import make_mesh
        mesh = make_mesh(config.mesh)
    stage_dir = epath.Path(workdir).absolute() / STAGE
    stage_dir.mkdir(parents=True, exist_ok=True)
    report_path = stage_dir / "report.json"
    num_steps = int(s1.loop.num_steps)
    latest = ckpt.Checkpointer(stage_dir / "checkpoints", save_every=0)
    finished = latest.latest_step() == num_steps
    latest.close()
    if finished and report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("steps") == num_steps:
            logging.info("stage1: %s is finished (step %d); keeping its report", stage_dir,
                         num_steps)
            return report
    if jax.process_index() == 0:
        (stage_dir / "config.json").write_text(
            ml_collections.ConfigDict(config.to_dict()).to_json_best_effort(indent=2, sort_keys=True))

    data_cfg = config.data.to_dict()
    # The sampling mode is the pipeline's business (and may be a str where the data defaults
    # declare a bool): keep it out of load_splits' type-checked defaults.
    balanced = data_cfg.pop("balanced_sampling", False)
    if isinstance(balanced, str) and balanced.lower() in ("", "none", "false", "off"):
        balanced = False
    splits = load_splits(data_cfg)
    train, val, test = splits["train"], splits["val"], splits.get("test")
    class_names = list(train.class_names)
    num_classes = len(class_names)
    image_size = int(config.model.vit.image_size)
    shd.check_batch(s1.batch_size, mesh, "config.stage1.batch_size")
    nproc = jax.process_count()
    logging.info("stage1: train %d maps, val %d, test %s; %d classes; batch %d x 3 views",
                 len(train), len(val), "none" if test is None else len(test), num_classes,
                 s1.batch_size)
    loader = image_loader(train, image_size=image_size, batch_size=s1.batch_size // nproc,
                          num_views=3, train=True, seed=int(config.data.get("seed", config.seed)),
                          balanced=balanced, worker_count=int(s1.loader_workers))
    cw = class_weights(np.asarray(train.labels), num_classes, s1.class_weighting)
    model = build_model(config, num_classes, s1)
    state, schedule = init_state(config, model, mesh, s1, rules)
    nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    logging.info("stage1: Stage1Model with %.2fM parameters", nparams / 1e6)

    last_val = {}       # step -> (metrics, predictions) of the latest in-training val eval

    def eval_fn(st, step):
        m, pred = evaluate_split(model, {"params": st.params, "batch_stats": st.batch_stats},
                                 val, class_names, image_size=image_size,
                                 batch_size=s1.eval_batch_size, mesh=mesh, rules=rules, tta=False,
                                 worker_count=int(s1.loader_workers))
        last_val.clear()
        last_val[step] = pred
        return {"val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"]}

    t_loop = time.time()
    result = loop.train_loop(
        stage_dir=stage_dir, cfg=s1.loop, state=state, train_step=make_train_step(model, s1, cw),
        train_iter=iter(loader), mesh=mesh, rules=rules,
        batch_fn=lambda b: {"views": b["views"], "label": b["label"]},
        eval_fn=eval_fn, learning_rate=schedule, name="stage1")
    outside_loop = (t_loop - t0)    # set-up time of this run; the final evaluation adds below

    # Model selection on val only: the best params (if any) else the final ones.
    variables = {"params": result.state.params, "batch_stats": result.state.batch_stats}
    selected = f"final (step {result.step})"
    selected_step = result.step
    if result.best_step is not None:
        keeper = ckpt.BestKeeper(stage_dir / "best", mode=s1.loop.select_mode)
        best = keeper.restore(result.state.replace(**ckpt.abstract_like(result.state.to_checkpoint())))
        keeper.close()
        variables = {"params": best.params, "batch_stats": best.batch_stats}
        selected = f"best on val {s1.loop.select_metric}={result.best_score:.4f} at step {result.best_step}"
        selected_step = result.best_step
    logging.info("stage1: evaluating the %s params", selected)
    t_eval = time.time()
    per_split = {}
    for name, ds in (("val", val), ("test", test)):
        if ds is None:
            continue
        # The val predictions of the selected step were just made in training: reuse them.
        cached = last_val.get(selected_step) if name == "val" and not s1.tta else None
        m, _ = evaluate_split(model, variables, ds, class_names, image_size=image_size,
                              batch_size=s1.eval_batch_size, mesh=mesh, rules=rules, tta=s1.tta,
                              out_dir=stage_dir, split=name,
                              embedding=s1.embedding_method if name == "val" else None,
                              embedding_points=s1.embedding_points, pred=cached,
                              worker_count=int(s1.loader_workers))
        per_split[name] = m
        logging.info("stage1 %s: accuracy %.4f macro_f1 %.4f (%d maps%s)", name, m["accuracy"],
                     m["macro_f1"], m["num_examples"], ", 8-view TTA" if s1.tta else "")
    report_split = s1.report_split if s1.report_split in per_split else "val"
    top = per_split[report_split]
    report = {}
    if jax.process_index() == 0:
        report = write_report(
            stage_dir, stage=STAGE, steps=result.step, final_train_loss=result.final_train_loss,
            # training (all runs of this workdir) + this run's set-up and final evaluation
            wall_seconds=result.wall_seconds + outside_loop + (time.time() - t_eval),
            metrics={k: top[k] for k in ("accuracy", "macro_f1", "per_class", "weighted_f1",
                                         "num_examples", "confusion_matrix", "class_names")},
            report_split=report_split, selected_on="val", selection=selected,
            tta=bool(s1.tta), pscl_weight=float(s1.pscl_weight),
            label_space=train.label_space, data_source=str(config.data.get("source", "")),
            train_wall_seconds=result.wall_seconds,
            splits={k: {kk: v[kk] for kk in ("accuracy", "macro_f1", "weighted_f1",
                                             "num_examples", "per_class", "top3_accuracy")}
                    for k, v in per_split.items()},
            confusion_png={k: v.get("confusion_png") for k, v in per_split.items()},
            embedding_png=per_split["val"].get("embedding_png"),
            history=result.history, evals=result.evals)
        logging.info("stage1: report %s (%s accuracy %.4f, macro_f1 %.4f)", report_path,
                     report_split, report["accuracy"], report["macro_f1"])
    return report
