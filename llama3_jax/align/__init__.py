"""Post-training as in Llama 3-Instruct: chat-format SFT, a Bradley-Terry reward model and
DPO against a frozen reference (`objectives`), what each stage brings to train.py's loop
(`stages`), and a synthetic, verifiable arithmetic task that needs no download (`task`).

Imports: config, parallel, model, data, formats and infer (the generator for evaluation).
"""
