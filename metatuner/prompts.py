"""Meta-prompts, kept as data in one place.

``GENERATOR[mode]`` is what the prompt generator G reads: the task's initial instruction ``p~`` and the
query ``x`` (METHOD.md section 3). In ``rewrite`` mode (the paper's form) G answers with a whole new
instruction for that query; in ``append`` mode it answers with a short hint for that query, which is
added after ``p~`` (an empty answer keeps ``p~`` alone).
"""

GENERATOR = {
    "rewrite": {
        "system": "You improve instructions for an assistant. Keep what the instruction requires, such as the answer format.",
        "user": (
            "Instruction: {instruction}\n\n"
            "Question: {query}\n\n"
            "Rewrite the instruction so that it best helps the assistant answer this question. "
            "Reply with the rewritten instruction only."
        ),
    },
    "append": {
        "system": "You give an assistant one short hint for a question. Never solve the question or state its answer.",
        "user": (
            "Instruction: {instruction}\n\n"
            "Question: {query}\n\n"
            "Write one short sentence that helps the assistant follow the instruction on this question, "
            "or nothing if the instruction is enough."
        ),
    },
}


def generator_messages(instruction: str, query: str, mode: str = "rewrite") -> list[dict[str, str]]:
    """G's chat input for one query: ``p~`` and ``x`` in the template of ``mode`` (rewrite or append)."""
    template = GENERATOR[mode]
    return [
        {"role": "system", "content": template["system"]},
        {"role": "user", "content": template["user"].format(instruction=instruction, query=query)},
    ]


# OPRO's meta-prompt (Yang et al., "Large Language Models as Optimizers", 2023), in the form the paper
# gives for instruction-tuned optimizers: earlier instructions with their scores (0-100) in ascending
# order, a few training queries with gold answers, and a request for a better instruction in brackets.
OPRO = {
    "header": (
        "I have some texts along with their corresponding scores. The texts are arranged in ascending order "
        "based on their scores, where higher scores indicate better quality."
    ),
    "scored": "text:\n{instruction}\nscore:\n{score}",
    "examples": (
        "The following exemplars show how to apply your text: you replace <INS> in each input with your text, "
        "then read the input and give an output. We say your output is wrong if your output is different from "
        "the given output, and we say your output is correct if they are the same."
    ),
    "example": "input:\nQ: <INS>\n{query}\nA:\noutput:\n{answer}",
    "footer": (
        "Write your new text that is different from the old ones and has a score as high as possible. "
        "Write the text in square brackets."
    ),
}


def opro_meta_prompt(scored: list[tuple[str, int]], examples: list[tuple[str, str]]) -> str:
    """OPRO's meta-prompt from (instruction, score 0-100) pairs, already ordered, and (query, answer) pairs."""
    parts = [OPRO["header"]]
    parts += [OPRO["scored"].format(instruction=i, score=s) for i, s in scored]
    parts.append(OPRO["examples"])
    parts += [OPRO["example"].format(query=q, answer=a) for q, a in examples]
    parts.append(OPRO["footer"])
    return "\n\n".join(parts)


# BPO (Cheng et al., "Black-Box Prompt Optimization", 2023). ``released`` is the template of the released
# rewriter (THUDM/BPO), plain text with no chat template; ``system`` / ``user`` are the chat meta-prompt with
# which M samples rewrites of a user's prompt for bpo-selfpairs, in BPO's spirit (clearer, more specific,
# same meaning). The task's instruction is shown as context: M still reads it as the system turn.
BPO = {
    "released": (
        "[INST] You are an expert prompt engineer. Please help me improve this prompt to get a more helpful "
        "and harmless response:\n{prompt} [/INST]"
    ),
    "system": "You are an expert prompt engineer. You rewrite a user's prompt so an assistant answers it better.",
    "user": (
        "The assistant follows this instruction: {instruction}\n\n"
        "User's prompt: {prompt}\n\n"
        "Rewrite the user's prompt to be clearer and more specific. Keep its meaning and every number, name "
        "and option in it; do not answer it. Reply with the rewritten prompt only."
    ),
}


def bpo_messages(instruction: str, prompt: str) -> list[dict[str, str]]:
    """The chat input with which M (the bpo-selfpairs rewriter) rewrites a user's ``prompt``."""
    return [
        {"role": "system", "content": BPO["system"]},
        {"role": "user", "content": BPO["user"].format(instruction=instruction, prompt=prompt)},
    ]
