"""Fill-in-the-middle prompts from a tokenizer's own FIM tokens (pure: a tokenizer, no model).

`fim_tokens(tokenizer)` finds the prefix / suffix / middle markers among the tokenizer's tokens
(by their spelling, never by the model's name) and the tokens that end a middle; None when the
tokenizer has none. `fim_prompt(tokens, tokenizer, prefix, suffix)` is the prompt in the
prefix-suffix-middle order every listed family uses: P prefix S suffix M (the model writes the
middle, then one of `tokens.end_ids`). `extra_context(tokens, tokenizer, extra, extra_budget)` is
what goes before it for llama.cpp's `/infill` `input_extra` ((filename, text) chunks of other
files), laid out as llama.cpp's `format_infill` does: with the tokenizer's repo-level tokens R
(repo name) and F (file separator), "R myproject\n", then "F filename\n text" per chunk, then
"F filename\n" for the file being edited; without F, each chunk after "\n\n--- snippet ---\n\n";
ids beyond `extra_budget` are dropped from the front.

Example (Qwen2.5-Coder): "<|fim_prefix|>def f(x):\n<|fim_suffix|>\n    return y<|fim_middle|>",
ended by <|endoftext|>, <|fim_pad|>, <|file_sep|>, <|repo_name|> or a FIM marker.
"""

from __future__ import annotations

from dataclasses import dataclass

# (prefix, suffix, middle) markers of the FIM families, as their tokenizers spell them
FIM_MARKERS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, Granite-Code
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),  # DeepSeek-Coder
    ("\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>"),  # Code Llama
)
# repo-level context markers: (repo name, file separator), where the tokenizer has them
FIM_REPO_SPELLINGS = ("<|repo_name|>", "<reponame>", "<repo_name>")
FIM_FILE_SEP_SPELLINGS = ("<|file_sep|>", "<file_sep>", "<|file_separator|>")
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"  # llama.cpp's chunk separator without a file separator token
# tokens that end a middle (besides the FIM markers and the tokenizer's EOS), where the tokenizer has them
FIM_END_SPELLINGS = ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<fim_pad>", "<file_sep>",
                     "<|end_of_text|>", "<EOT>", "\u2581<EOT>")


@dataclass(frozen=True)
class FimTokens:
    prefix_id: int
    suffix_id: int
    middle_id: int
    end_ids: tuple[int, ...]  # the tokens that end a middle (the generation stops at any of them)
    repo_id: int | None = None  # repo-level context: the repo name marker (None: the tokenizer has none)
    file_sep_id: int | None = None  # repo-level context: the file separator (None: the tokenizer has none)


def _token_id(tokenizer, spelling: str) -> int | None:
    """The id of the token spelled exactly `spelling`, or None."""
    tid = tokenizer.convert_tokens_to_ids(spelling)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id
                       and spelling != tokenizer.unk_token):
        return None
    return int(tid) if tokenizer.convert_ids_to_tokens(int(tid)) == spelling else None


def fim_tokens(tokenizer) -> FimTokens | None:
    """The tokenizer's FIM markers and middle-ending tokens; None when it has no complete marker set."""
    for spellings in FIM_MARKERS:
        ids = [_token_id(tokenizer, s) for s in spellings]
        if all(i is not None for i in ids):
            ends = [_token_id(tokenizer, s) for s in FIM_END_SPELLINGS]
            eos = tokenizer.eos_token_id
            end_ids = {i for i in ends if i is not None} | set(ids) | ({int(eos)} if eos is not None else set())
            return FimTokens(ids[0], ids[1], ids[2], tuple(sorted(end_ids)),
                             _first_id(tokenizer, FIM_REPO_SPELLINGS), _first_id(tokenizer, FIM_FILE_SEP_SPELLINGS))
    return None


def _first_id(tokenizer, spellings: tuple[str, ...]) -> int | None:
    return next((i for i in (_token_id(tokenizer, s) for s in spellings) if i is not None), None)


def _encoder(tokenizer):
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def fim_prompt(tokens: FimTokens, tokenizer, prefix: str, suffix: str) -> list[int]:
    """The FIM prompt's ids: P + prefix + S + suffix + M (the texts encoded without special tokens)."""
    encode = _encoder(tokenizer)
    return [tokens.prefix_id, *encode(prefix), tokens.suffix_id, *encode(suffix), tokens.middle_id]


def extra_context(tokens: FimTokens, tokenizer, extra: tuple[tuple[str, str], ...],
                  extra_budget: int | None = None) -> list[int]:
    """The ids of the repo-level context before the FIM prompt (llama.cpp's layout, see above): its
    last `extra_budget` ids (None: all). `extra`: (filename, text) chunks, "" filename = "tmp"."""
    encode, out = _encoder(tokenizer), []
    if tokens.repo_id is not None:
        out += [tokens.repo_id, *encode("myproject\n")]
    for filename, text in extra:
        if tokens.file_sep_id is not None:
            out += [tokens.file_sep_id, *encode((filename or "tmp") + "\n")]
        else:
            out += encode(SNIPPET_SEPARATOR)
        out += encode(text)
    if tokens.file_sep_id is not None:
        out += [tokens.file_sep_id, *encode("filename\n")]
    if extra_budget is not None:
        out = out[len(out) - max(0, min(extra_budget, len(out))):]
    return out
