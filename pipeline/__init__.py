"""distil: DistilBERT-style distillation of BERT-family teachers on Ray (see docs/architecture.md)."""
