"""What clients do with a loaded model besides raw generation: chat conversations (local and remote), the
non-generative pipelines (classification, NER, question answering), embeddings and perplexity."""
