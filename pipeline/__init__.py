"""distil: DistilBERT-style distillation of BERT-family teachers on Ray (see README.md, "How the code fits together")."""
