"""Where and how a run computes, and surviving the machine: what Lightning and torch cannot know on their own.

  sharding       hardware=fsdp / deepspeed: the strategy from plain settings, a wrap policy per transformer layer
                 (found through the family adapter), the compressors that cannot run sharded, the model gathered
                 back after fit
  pipeline       hardware=pipeline: a causal LM cut into stages, one process each, torch's GPipe/1F1B schedules
  checkpointing  mid-epoch checkpoints, stop signals, exact resume, Slurm requeue; fit's best validation
                 checkpoint restored
  retention      what a finished run keeps: its model and record; the checkpoints only a resume needs dropped
  safe_load      checkpoint files read as data (torch's weights-only unpickler), never run as code
"""
