"""Meta-prompts, kept as data in one place.

``REWRITE`` is what the prompt generator G reads: the task's initial instruction ``p~`` and the query
``x``; it answers with a rewritten instruction for that query (METHOD.md section 3).
"""

REWRITE = {
    "system": "You improve instructions for an assistant. Keep what the instruction requires, such as the answer format.",
    "user": (
        "Instruction: {instruction}\n\n"
        "Question: {query}\n\n"
        "Rewrite the instruction so that it best helps the assistant answer this question. "
        "Reply with the rewritten instruction only."
    ),
}


def rewrite_messages(instruction: str, query: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": REWRITE["system"]},
        {"role": "user", "content": REWRITE["user"].format(instruction=instruction, query=query)},
    ]
