"""The paper's evaluations: perplexity, needle in a haystack, gates and memory inspection."""
