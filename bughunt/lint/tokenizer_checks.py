"""Lint checks of the tokenizer files: loadable, BOS, add_bos_token, the chat template, special tokens, vocabulary size."""

from __future__ import annotations

import json

from bughunt.lint.catalog import EXPECTS_BOS, _Context, Finding, _finding, _Skip


def check_transformers_config(ctx: _Context) -> list[Finding]:
    err = ctx.transformers_config_error
    if err:
        return [_finding("transformers-rejects-config", f"transformers.AutoConfig fails: {err[:300]}", error=err)]
    return []


def check_tokenizer_loads(ctx: _Context) -> list[Finding]:
    if not any(n in ctx.tokenizer_files for n in ("tokenizer.json", "tokenizer.model")):
        raise _Skip("no tokenizer files (tokenizer.json or tokenizer.model) in the checkpoint")
    if ctx.transformers_config_error:
        raise _Skip("transformers rejects config.json, which AutoTokenizer reads to pick the tokenizer class")
    try:
        ctx.tokenizer
    except _Skip as e:
        return [_finding("tokenizer-unloadable", str(e))]
    return []


def _bos_id(ctx: _Context, tok) -> int | None:
    return ctx.spec.bos_token_id if ctx.spec.bos_token_id is not None else tok.bos_token_id


def _tokenizer_adds_bos(ctx: _Context) -> tuple[bool, list[int], int | None]:
    tok = ctx.tokenizer
    bos = _bos_id(ctx, tok)
    ids = [int(i) for i in tok("Hello world")["input_ids"]]
    return bos is not None and bool(ids) and ids[0] == bos, ids, bos


def check_bos_measured(ctx: _Context) -> list[Finding]:
    """The tokenizer's BOS convention against the one the weights were measured to prefer (bos_measure.py): an error
    only when the tokenizer's convention loses by a clear margin."""
    m = ctx.bos_evidence
    if isinstance(m, str):
        raise _Skip(f"BOS convention not measured: {m}")
    note = m.summary()
    ctx.notes.update({"tokenizer-no-bos": note, "tokenizer-bos-unwanted": note})
    if m.prefers == "with" and not m.tokenizer_adds_bos:
        return [_finding("tokenizer-no-bos", f"the tokenizer adds no BOS, but the weights need it: {note}", **m.as_dict())]
    if m.prefers == "without" and m.tokenizer_adds_bos:
        return [_finding("tokenizer-bos-unwanted", f"the tokenizer adds BOS, but the weights do better without it: {note}",
                         **m.as_dict())]
    return []


def check_bos_unmeasured(ctx: _Context) -> list[Finding]:
    """Where the convention cannot be measured: a warning, on the family's usual convention, that says so."""
    m = ctx.bos_evidence
    if not isinstance(m, str):
        raise _Skip(f"the BOS convention was measured ({'BOS first' if m.prefers == 'with' else 'no BOS' if m.prefers else 'no clear preference'})")
    adds, ids, bos = _tokenizer_adds_bos(ctx)
    if adds:
        ctx.notes["tokenizer-bos-unmeasured"] = f"the tokenizer adds BOS (id {bos}); not measured: {m}"
        return []
    if ctx.spec.family not in EXPECTS_BOS:
        ctx.notes["tokenizer-bos-unmeasured"] = f"no BOS, and {ctx.spec.family} tokenizers usually add none; not measured: {m}"
        return []
    return [_finding("tokenizer-bos-unmeasured", f"tokenizer('Hello world') gives {ids[:6]}, without BOS (id {bos}); not "
                                                 f"measured ({m}), so this assumes the {ctx.spec.family} convention of BOS first",
                     ids=ids, bos_token_id=bos, not_measured=m, assumed=f"{ctx.spec.family}: BOS first")]


def check_add_bos_flag(ctx: _Context) -> list[Finding]:
    path = ctx.checkpoint / "tokenizer.json"
    tcfg_path = ctx.checkpoint / "tokenizer_config.json"
    if not path.exists() or not tcfg_path.exists():
        raise _Skip("needs both tokenizer.json and tokenizer_config.json")
    try:
        flag = json.loads(tcfg_path.read_text(encoding="utf-8")).get("add_bos_token")
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(path))
    except Exception as e:
        raise _Skip(f"cannot read the tokenizer files ({type(e).__name__}: {e})") from None
    if flag is None:
        raise _Skip("tokenizer_config.json does not set add_bos_token")
    bos = ctx.spec.bos_token_id
    if bos is None:
        raise _Skip("config.json names no bos_token_id")
    ids = raw.encode("Hello world").ids
    adds = bool(ids) and ids[0] == bos
    if adds != bool(flag):
        return [_finding("add-bos-token-disagrees", f"tokenizer_config.json add_bos_token={flag} but tokenizer.json "
                                                    f"{'adds' if adds else 'does not add'} BOS: {ids[:6]}",
                         add_bos_token=flag, tokenizer_json_adds_bos=adds)]
    return []


def check_chat_template(ctx: _Context) -> list[Finding]:
    tok = ctx.tokenizer
    if not getattr(tok, "chat_template", None):
        raise _Skip("the tokenizer has no chat template")
    bos = _bos_id(ctx, tok)
    if bos is None:
        raise _Skip("neither config.json nor the tokenizer names a BOS token")
    messages = [{"role": "user", "content": "Hello"}]
    try:
        ids = list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise _Skip(f"the chat template does not render a one-message conversation ({type(e).__name__}: {e})") from None
    lead = next((k for k, i in enumerate(ids) if i != bos), len(ids))
    out = []
    if lead >= 2:
        out.append(_finding("chat-template-double-bos", f"apply_chat_template(tokenize=True) starts with {lead} BOS tokens: {ids[:6]}",
                            ids=ids[:32], bos_token_id=bos))
    elif lead == 0 and (basis := _wants_bos(ctx)) is not None:
        out.append(_finding("chat-template-missing-bos", f"apply_chat_template(tokenize=True) gives {ids[:6]}, without BOS (id {bos}); {basis}",
                            ids=ids[:32], bos_token_id=bos, basis=basis))
    if lead >= 1:
        retok = list(tok(text)["input_ids"])
        if len(retok) >= 2 and retok[0] == bos and retok[1] == bos:
            out.append(_finding("chat-template-bos-retokenized",
                                f"the rendered template starts with {tok.bos_token!r} and tokenizer(text) adds another: {retok[:6]}",
                                ids=retok[:32], bos_token_id=bos))
    return out


def _wants_bos(ctx: _Context) -> str | None:
    """Why the model wants BOS first (the measurement, else the family's usual convention), or None when it does not
    (the reason is left as the chat check's note)."""
    m = ctx.bos_evidence
    if not isinstance(m, str):
        if m.prefers == "with":
            return m.summary()
        ctx.notes["chat-template-missing-bos"] = f"the chat path gives no BOS and the weights do not need it: {m.summary()}"
        return None
    if ctx.spec.family in EXPECTS_BOS:
        return f"not measured ({m}), so this assumes the {ctx.spec.family} convention of BOS first"
    ctx.notes["chat-template-missing-bos"] = f"the chat path gives no BOS; not measured ({m}), and {ctx.spec.family} tokenizers usually add none"
    return None


def check_special_tokens(ctx: _Context) -> list[Finding]:
    tok = ctx.tokenizer
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    out = []
    roles = [("bos", ctx.spec.bos_token_id, tok.bos_token, tok.bos_token_id),
             ("pad", ctx.spec.pad_token_id, tok.pad_token, tok.pad_token_id)]
    roles += [("eos", e, tok.eos_token, tok.eos_token_id) for e in ctx.eos_ids()]
    for role, cid, tstr, tid in roles:
        if cid is None:
            continue
        if cid not in by_id:
            out.append(_finding("special-token-missing", f"config.json {role}_token_id={cid} is not in the tokenizer vocabulary "
                                                         f"({len(by_id)} entries)", role=role, config_id=cid))
            continue
        if tstr is None or tid is None:
            continue
        if role == "eos":
            if tid not in ctx.eos_ids() and cid == ctx.eos_ids()[0]:
                out.append(_finding("special-token-mismatch", f"config.json eos_token_id {ctx.eos_ids()} does not include the "
                                                              f"tokenizer's eos_token {tstr!r} (id {tid})",
                                    role=role, config_id=ctx.eos_ids(), config_token=by_id[cid], tokenizer_token=tstr, tokenizer_id=tid))
        elif cid != tid:
            out.append(_finding("special-token-mismatch", f"config.json {role}_token_id={cid} is {by_id[cid]!r}, but the tokenizer's "
                                                          f"{role}_token is {tstr!r} (id {tid})",
                                role=role, config_id=cid, config_token=by_id[cid], tokenizer_token=tstr, tokenizer_id=tid))
    return out


def check_tokenizer_size(ctx: _Context) -> list[Finding]:
    tok = ctx.tokenizer
    n, v = len(tok), ctx.spec.vocab_size
    if n > v:
        extra = sorted(i for i in tok.get_vocab().values() if i >= v)
        return [_finding("tokenizer-vocab-exceeds-model", f"the tokenizer has {n} tokens but vocab_size is {v}; ids "
                                                          f"{extra[:10]} have no embedding row", tokenizer_size=n, vocab_size=v,
                         ids_past_vocab=extra[:100])]
    return []


