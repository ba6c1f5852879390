"""Post-training: supervised fine-tuning on chat data (`train.objective: sft`) and direct preference
optimisation (`train.objective: dpo`), through the same trainer as pretraining (atlas_jax.train).

`templates`: chat templates; `data`: JSONL -> rendered, tokenized, masked rows; `batches`: the
step-indexed train iterator and the val rows; `losses`: the masked SFT loss and the DPO loss.
"""
