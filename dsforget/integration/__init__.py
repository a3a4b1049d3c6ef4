"""dsforget inside the tools that run it: DeepSpeed (initialize, config rules), launcher
rendezvous (deepspeed, torchrun, srun, mpirun), gathering one block at a time under ZeRO-3, the
Hugging Face Trainer and the Hugging Face export."""
