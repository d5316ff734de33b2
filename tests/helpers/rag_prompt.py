"""The tests' RAG prompt: a system prompt, three short documents and a question about one."""

from __future__ import annotations

SYSTEM = "You are a helpful assistant. Answer the question using the documents."
DOCS = (
    "Marla Quistenby was born in the city of Dravenport. She later moved to Oslen.",
    "The Varnholt bridge crosses the river Tesk. It was finished in 1931.",
    "Edwin Palk works as a glassblower in the town of Hobbridge.",
)
QUESTION = "In which city was Marla Quistenby born?"
