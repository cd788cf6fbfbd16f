"""Persona-grounded dialog, ConvAI2 style: persona sentences + dialog history → the next utterance.

Data: Persona-Chat (hub, or a local JSON in the ConvAI2 layout) or the offline ChatterBot corpus
(YAML), whose distractor candidates are sampled, seeded, from other conversations' replies.

Input: one text per candidate reply, with plain-text speaker prefixes (no added tokens, so the
saved model is the base architecture with its own tokenizer, zero-shot models read the format, and
a teacher or a speculative-decoding draft shares the vocabulary):

    Persona: i like to ski.
    User: hi! what do you do for fun?
    Bot: <candidate reply><eos>

Batches hold only what a causal LM takes (input_ids, attention_mask, labels), so every compressor
sees the same batches as on the other tasks: an example is C consecutive rows, one per candidate,
the gold reply last; labels are the gold reply's tokens and -100 everywhere else (context, padding
and distractor rows). `model(**batch).loss` is therefore the reply LM loss.

Training adds a next-utterance classification loss (a linear head on the last token's hidden state,
over the C candidates), kept in the LightningModule: it is in the Lightning checkpoint but not in
the saved model, which stays a plain causal LM. Hits@k ranks candidates by the LM's mean
log-likelihood of each reply, so it means the same for a fine-tuned, a compressed, a reloaded or
a zero-shot model.

Evaluation does not run those rows as they are: each context goes through the model once and every
candidate's reply, seeing only the context and itself, in one packed row (scoring.py): the full rows' numbers.

The package: corpora (reading ChatterBot/ConvAI2, splits, distractors), encoding (model inputs),
metrics (reply scores, Hits@k), scoring (candidates scored with each context encoded once), data
(DialogData), module (DialogModule).
"""
