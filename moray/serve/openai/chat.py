"""The chat template: the tokenizer's role tokens, as moray's instruction tuning writes them.

    <|system|>...<|end|><|user|>...<|end|><|assistant|>        (the model writes on from here)

(moray/data/tokenizer.py's `encode_chat`, the same function fine-tuning uses, so what a
model was taught is what it is served.) The reply ends where the model writes `<|end|>`
(or EOS): those ids are added to the request's stop tokens and never appear in the text.

OpenAI's `developer` role is the system role; content may be a string or a list of
text parts. Images and audio are refused by name (this server has no vision tower).
"""

from __future__ import annotations

from typing import List

from moray.data.tokenizer import TokenizerError
from moray.serve.openai.errors import bad_request
from moray.serve.openai.protocol import ChatMessage


def message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"messages[{index}].content: only text parts are served here (got type {kind!r})",
                              f"messages.{index}.content")
        texts.append(part["text"])
    return "".join(texts)


def chat_prompt_ids(tokenizer, messages: List[ChatMessage]) -> List[int]:
    if tokenizer is None:
        raise bad_request("this model has no tokenizer, so it has no chat template; use /v1/completions with "
                          "token ids", "messages")
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
             for i, m in enumerate(messages)]
    try:
        return tokenizer.encode_chat(plain, add_generation_prompt=True)
    except TokenizerError as err:
        raise bad_request(f"this model's tokenizer cannot write a chat prompt ({err}); use /v1/completions",
                          "messages") from None


def chat_stop_ids(tokenizer) -> List[int]:
    """The ids that end an assistant turn."""
    return [i for i in (getattr(tokenizer, "end_id", None), getattr(tokenizer, "eos_id", None)) if i is not None]
