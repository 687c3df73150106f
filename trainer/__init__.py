"""Semi-online training: score-conditioned LoRA SFT that resumes from the serving adapter each round.

    dataset.py   scored episodes -> chat examples with the achieved score's label; held-out split; export
    round.py     train_round: one run lifecycle for every objective (plan -> run row -> fit -> atomic
                 adapter -> done); takes a model or model id; resumes interrupted rounds
    sft.py       objective "sft": new blocks + replay sample as labelled chats; TRL SFTTrainer + PEFT LoRA,
                 configured for speed per device (fp32 on CPU, bf16 on CUDA)
    registry.py  adapter versions on disk and in the store; atomic folders; publish / reject
    gate.py      decide (pure: paired bootstrap rule, accept / keep / reject) and apply_verdict (store, publish)
    dpo.py       optional objective "dpo": winner/loser pairs for the same (ticker, as_of); TRL DPOTrainer

Multi-GPU: `accelerate launch --num_processes 2 -m scheduler.cli train` runs the same round under
DDP; ranks share the training_runs row and only the main process writes adapters and rows.
"""
