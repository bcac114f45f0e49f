"""What every stage shares: params, paths, atomic artifacts, the conversation shape and the Llama-2 renderer,
the base model and tokenizer, token ids and labels, the formatted rows, errors, the stage runner and the run lock."""
