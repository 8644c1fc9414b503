"""How a model is trained: the loop, AdamW and its schedule, FSDP2, the process group, sharded
checkpoints, throughput metrics and stop requests. Imports vit.models, vit.data and vit.tasks, never
vit.cluster."""
