"""The training job behind launch/finetune.py: run config, inputs, data position, loop,
checkpoints that resume exactly, and fault handling."""
