"""Entry points for the frameworks people train in: one module per framework.

Each module imports its framework when it is imported itself; importing ``flashoptim_dist``
(or this package) imports none of them.

* :mod:`flashoptim_dist.integrations.torchtitan` — ``FlashOptimizersContainer`` (Flash
  optimizers selectable by name in torchtitan's config) and the ``flash_optimizers`` override
  for its command line;
* :mod:`flashoptim_dist.integrations.lightning` — ``FlashFSDPStrategy`` (Lightning's FSDP1
  strategy with the shard layout a Flash optimizer needs); ``ModelParallelStrategy`` (FSDP2)
  needs nothing;
* Accelerate / the Hugging Face Trainer need no module: pass the optimizer class
  (``optimizer_cls_and_kwargs`` or ``accelerator.prepare(model, opt)``); the one trap there,
  Accelerate's fp32 upcast of a bf16 model, is refused by every Flash optimizer at its first
  step with the fix. DeepSpeed: :mod:`flashoptim_dist.deepspeed`.

``docs/integrations.md`` has a complete example per framework (each run by the tests).
"""
