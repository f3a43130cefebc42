"""Training: shared infrastructure and the stages (imported lazily by wamglm_jax.main).

  state.py       TrainState (step, params, opt_state, batch_stats, rng; static tx)
  optim.py       make_optimizer(cfg, num_steps, params): AdamW + warm-up cosine + clipping +
                 freezing by regex (cfg: default_optimizer_config())
  checkpoint.py  Checkpointer (orbax, items `state` + `data_iter`), BestKeeper (val selection),
                 abstract_like, CheckpointMismatchError, the WAMGLM_TEST_BLOCK_SAVE test hook
  loop.py        train_loop(...) -> LoopResult; default_loop_config(); NonFiniteError, Preempted
  metrics.py     clu metric averaging and writers
  signals.py     PreemptionFlag (SIGTERM -> save and exit 0)
  stage1.py      run(config, workdir, mesh): PSCL visual fine-tuning + evaluation report
  stage2.py      run(config, workdir, mesh): language fine-tuning
"""
