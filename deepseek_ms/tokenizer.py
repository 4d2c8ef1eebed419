"""Tokenizers for the generation engine and the OpenAI-style servers.

    from deepseek_ms.tokenizer import load_tokenizer
    tok = load_tokenizer("path/to/model_folder")
    ids = tok.encode("你好")                                   # bos + text ids
    text = tok.decode(ids, skip_special_tokens=True)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)

Two backends share one interface (`BaseTokenizer`), with names and semantics taken
from transformers so that callers can switch between the two without surprises:

* `FastTokenizer` wraps a `tokenizer.json` (DeepSeek's byte-level BPE) with the
  Rust `tokenizers` library and applies `tokenizer_config.json` the way
  transformers' `LlamaTokenizerFast` does (bos/eos post-processing, extra added
  tokens, special tokens). Its `encode`/`decode`/`apply_chat_template` are
  id-for-id and character-for-character identical to
  `AutoTokenizer.from_pretrained(folder)` on the DeepSeek tokenizers (checked by
  tests/test_tokenizer.py).
* `SentencePieceTokenizer` wraps a sentencepiece `tokenizer.model` (the byte
  fallback models our training pipeline produces). Encoding is sentencepiece's
  own, after splitting out special/added tokens (transformers' legacy Llama
  behaviour); decoding follows the converted fast Llama tokenizer: pieces are
  concatenated, "▁" becomes a space, byte pieces are joined into UTF-8, and the
  single dummy-prefix space at the very start is removed.

Chat templates are rendered with a sandboxed Jinja environment configured like
transformers' (see `render_chat_template`). Runtime code never imports
transformers.
"""
import abc
import datetime
import functools
import json
import logging
import numbers
import os
import re

logger = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# transformers' sentinel for "no limit" when tokenizer_config.json has no model_max_length
_NO_MAX_LENGTH = int(1e30)

# The attribute order matters: it is the order of `all_special_tokens`/`all_special_ids`.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Tokenizer classes whose transformers implementation rewrites the post-processor
# from add_bos_token/add_eos_token (instead of using the one in tokenizer.json).
_BOS_EOS_TEMPLATE_CLASSES = frozenset((
    "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
    "GemmaTokenizer", "GemmaTokenizerFast",
))

# transformers' `clean_up_tokenization`, applied in order when clean_up_tokenization_spaces is on
# The constructor defaults of those classes, used when tokenizer_config.json has no such key
# (an explicit null still means "no token").
_LLAMA_DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

_CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class TokenizerError(ValueError):
    """A tokenizer folder, file or chat template that cannot be used."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """The folder does not exist or holds no tokenizer file."""


# --------------------------------------------------------------------------------------
# tokenizer_config.json
# --------------------------------------------------------------------------------------
class AddedTokenSpec:
    """One token declared in tokenizer_config.json (an AddedToken dict or a plain string)."""

    __slots__ = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")

    def __init__(self, content, single_word=False, lstrip=False, rstrip=False, normalized=None, special=False):
        self.content = content
        self.single_word = bool(single_word)
        self.lstrip = bool(lstrip)
        self.rstrip = bool(rstrip)
        # tokenizers' default: special tokens are matched on raw text, others after normalization
        self.normalized = (not special) if normalized is None else bool(normalized)
        self.special = bool(special)

    def __repr__(self):
        return "AddedTokenSpec({!r}, special={})".format(self.content, self.special)


def _token_spec(value, where, path, special):
    if value is None:
        return None
    if isinstance(value, str):
        return AddedTokenSpec(value, special=special)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return AddedTokenSpec(
            value["content"], value.get("single_word", False), value.get("lstrip", False),
            value.get("rstrip", False),
            # an AddedToken built from a dict is normalized unless the dict says it is special
            value.get("normalized", not value.get("special", False)),
            value.get("special", special))
    raise TokenizerError("{}: {} must be a string, null or an AddedToken object with a 'content' "
                         "string, got {!r}".format(path, where, value))


def _read_json_object(path):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise TokenizerError("malformed {}: {} (line {}, column {})".format(
            path, exc.msg, exc.lineno, exc.colno)) from exc
    except UnicodeDecodeError as exc:
        raise TokenizerError("malformed {}: not UTF-8 text ({})".format(path, exc)) from exc
    except OSError as exc:
        raise TokenizerError("cannot read {}: {}".format(path, exc)) from exc
    if not isinstance(data, dict):
        raise TokenizerError("malformed {}: expected a JSON object at the top level, got {}".format(
            path, type(data).__name__))
    return data


class TokenizerConfig:
    """The settings of tokenizer_config.json (+ special_tokens_map.json, chat_template.jinja)
    that change what a tokenizer produces. Unknown keys are kept in `raw`."""

    def __init__(self, folder):
        self.path = os.path.join(folder, TOKENIZER_CONFIG)
        raw = _read_json_object(self.path) if os.path.isfile(self.path) else {}
        self.raw = raw
        path = self.path

        # transformers lets special_tokens_map.json override the config's special tokens
        map_path = os.path.join(folder, SPECIAL_TOKENS_MAP)
        overrides = _read_json_object(map_path) if os.path.isfile(map_path) else {}

        def pick(key):
            if overrides.get(key):
                return overrides[key], map_path
            return raw.get(key), path

        self.special = {}
        for name in SPECIAL_TOKEN_NAMES:
            value, source = pick(name)
            self.special[name] = _token_spec(value, name, source, special=True)

        extra, source = pick("additional_special_tokens")
        if extra is None:
            extra = []
        if not isinstance(extra, list):
            raise TokenizerError("{}: additional_special_tokens must be a list, got {!r}".format(source, extra))
        self.additional_special_tokens = [
            _token_spec(v, "additional_special_tokens[{}]".format(i), source, special=True)
            for i, v in enumerate(extra)]

        decoder = raw.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise TokenizerError("{}: added_tokens_decoder must be an object of id -> token".format(path))
        self.added_tokens = {}
        for key, value in decoder.items():
            try:
                token_id = int(key)
            except ValueError:
                raise TokenizerError("{}: added_tokens_decoder key {!r} is not an integer id".format(
                    path, key)) from None
            self.added_tokens[token_id] = _token_spec(
                value, "added_tokens_decoder[{}]".format(key), path, special=False)

        self.add_bos_token = self._optional_bool("add_bos_token")
        self.add_eos_token = self._optional_bool("add_eos_token")
        self.legacy = self._optional_bool("legacy")
        self.clean_up_tokenization_spaces = bool(self._optional_bool("clean_up_tokenization_spaces"))
        self.split_special_tokens = bool(self._optional_bool("split_special_tokens"))
        self.tokenizer_class = raw.get("tokenizer_class")

        max_len = raw.get("model_max_length", _NO_MAX_LENGTH)
        if max_len is None:
            max_len = _NO_MAX_LENGTH
        if not isinstance(max_len, (int, float)) or isinstance(max_len, bool):
            raise TokenizerError("{}: model_max_length must be a number, got {!r}".format(path, max_len))
        self.model_max_length = int(max_len)

        self.chat_template = self._chat_template(folder, raw.get("chat_template"))

    def _optional_bool(self, key):
        value = self.raw.get(key)
        if value is not None and not isinstance(value, bool):
            raise TokenizerError("{}: {} must be true or false, got {!r}".format(self.path, key, value))
        return value

    def _chat_template(self, folder, value):
        # Like transformers, a chat_template.jinja file wins over the config's template.
        jinja_path = os.path.join(folder, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as handle:
                return handle.read()
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            named = {}
            for entry in value:
                if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                        and isinstance(entry.get("template"), str)):
                    raise TokenizerError("{}: each chat_template entry must be {{\"name\": str, \"template\": "
                                         "str}}, got {!r}".format(self.path, entry))
                named[entry["name"]] = entry["template"]
            return named
        raise TokenizerError("{}: chat_template must be a string or a list of named templates, got {}".format(
            self.path, type(value).__name__))


# --------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _compile_template(source):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # transformers templates may wrap assistant text in {% generation %} to build
        # assistant masks; we only render, so the block is transparent.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes <, >, & and ' which would corrupt prompts.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError("chat template does not compile: {} (line {})".format(exc.message, exc.lineno)) from exc


def render_chat_template(template, messages, add_generation_prompt=False, tools=None, documents=None,
                         continue_final_message=False, **variables):
    """Render one conversation with transformers' chat-template semantics.

    `variables` become template globals (bos_token, thinking, ...). `messages`,
    `tools`, `documents` and `add_generation_prompt` are always defined, as in
    transformers. With `continue_final_message` the output stops right after the
    last message's content so the model continues it (assistant prefill).
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible: "
                         "pass add_generation_prompt=False to continue the final message")
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, dict):
                raise TypeError("tools must be JSON-schema dicts, got {}".format(type(tool).__name__))
        tools = list(tools)
    if documents is not None:
        for document in documents:
            if not isinstance(document, dict):
                raise TypeError("documents must be dicts (e.g. with 'title' and 'text' keys)")

    messages = list(messages)
    final_content = None
    if continue_final_message:
        if not messages:
            raise ValueError("continue_final_message needs at least one message")
        messages, final_content = _tag_final_message(messages)

    rendered = _compile_template(template).render(
        messages=messages, tools=tools, documents=documents,
        add_generation_prompt=add_generation_prompt, **variables)

    if continue_final_message:
        marker = _CONTINUE_TAG.strip()
        if final_content.strip() not in rendered or marker not in rendered:
            raise ValueError("continue_final_message is set but the chat template dropped (part of) the "
                             "final message, so there is nothing to continue")
        cut = rendered.rindex(marker)
        if rendered.startswith(_CONTINUE_TAG, cut):
            rendered = rendered[:cut]
        else:
            # the template trimmed whitespace after the content, so trailing spaces are unreliable
            rendered = rendered[:cut].rstrip()
    return rendered


def _tag_final_message(messages):
    """Copy of `messages` whose final text ends with a marker, and that text."""
    last = dict(messages[-1])
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = content + _CONTINUE_TAG
        return messages[:-1] + [last], content
    if isinstance(content, (list, tuple)):
        blocks = [dict(b) if isinstance(b, dict) else b for b in content]
        for block in reversed(blocks):
            if isinstance(block, dict) and "text" in block:
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                last["content"] = blocks
                return messages[:-1] + [last], text
    raise ValueError("continue_final_message is set but the final message has no text to continue")


# --------------------------------------------------------------------------------------
# common interface
# --------------------------------------------------------------------------------------
class BaseTokenizer(abc.ABC):
    """What the engine and the servers use; see the module docstring."""

    def __init__(self, folder, config):
        self.name_or_path = folder
        self.config = config
        self.chat_template = config.chat_template
        self.model_max_length = config.model_max_length
        self.clean_up_tokenization_spaces = config.clean_up_tokenization_spaces
        self.add_bos_token = True if config.add_bos_token is None else config.add_bos_token
        self.add_eos_token = bool(config.add_eos_token)
        self.legacy = True if config.legacy is None else config.legacy
        self._special = {name: (spec.content if spec else None) for name, spec in config.special.items()}
        self.additional_special_tokens = [spec.content for spec in config.additional_special_tokens]

    # special tokens -------------------------------------------------------------------
    bos_token = property(lambda self: self._special["bos_token"])
    eos_token = property(lambda self: self._special["eos_token"])
    unk_token = property(lambda self: self._special["unk_token"])
    sep_token = property(lambda self: self._special["sep_token"])
    pad_token = property(lambda self: self._special["pad_token"])
    cls_token = property(lambda self: self._special["cls_token"])
    mask_token = property(lambda self: self._special["mask_token"])

    def _special_id(self, name):
        token = self._special[name]
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))
    sep_token_id = property(lambda self: self._special_id("sep_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    cls_token_id = property(lambda self: self._special_id("cls_token"))
    mask_token_id = property(lambda self: self._special_id("mask_token"))

    @property
    def special_tokens_map(self):
        """Set special tokens by attribute name (the chat template sees these as variables)."""
        out = {name: token for name, token in self._special.items() if token is not None}
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    @property
    def all_special_tokens(self):
        seen = []
        for token in [t for t in self._special.values() if t is not None] + self.additional_special_tokens:
            if token not in seen:
                seen.append(token)
        return seen

    @property
    def all_special_ids(self):
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # vocabulary -----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def vocab_size(self):
        """Size of the base vocabulary, without added tokens (as in transformers)."""
        ...

    @abc.abstractmethod
    def __len__(self):
        """Size of the full vocabulary, added tokens included."""
        ...

    @abc.abstractmethod
    def _id_to_token(self, token_id):
        ...

    @abc.abstractmethod
    def _token_to_id(self, token):
        ...

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        """Token strings for an id (-> str, None if out of range) or a list of ids."""
        if isinstance(ids, numbers.Integral):
            return self._id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_ids(self, tokens):
        """Ids for a token string (unknown -> unk id, possibly None) or a list of them."""
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._convert_one_token(tokens)
        return [self._convert_one_token(t) for t in tokens]

    def _convert_one_token(self, token):
        token_id = self._token_to_id(token)
        if token_id is None:
            unk = self._special["unk_token"]
            return None if unk is None else self._token_to_id(unk)
        return token_id

    # text -----------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, text, add_special_tokens=True):
        ...

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        """Text for `ids` (an int, or any iterable of ints such as a list or a numpy array)."""
        ids = [int(ids)] if isinstance(ids, numbers.Integral) else [int(i) for i in ids]
        text = self._decode(ids, skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            for old, new in _CLEANUP_REPLACEMENTS:
                text = text.replace(old, new)
        return text

    @abc.abstractmethod
    def _decode(self, ids, skip_special_tokens):
        ...

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    # chat -----------------------------------------------------------------------------
    def get_chat_template(self, chat_template=None, tools=None):
        """The template source to use: an explicit template or template name, else the tokenizer's."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None:
                return own.get(chat_template, chat_template)
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise TokenizerError("{} has several chat templates and none is named 'default'; pass one of {} "
                                 "as chat_template".format(self.name_or_path, sorted(own)))
        if chat_template is not None:
            return chat_template
        if own is None:
            raise TokenizerError("{} has no chat template (no chat_template in {} and no {}); pass "
                                 "chat_template=...".format(self.name_or_path, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE))
        return own

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, tools=None,
                            documents=None, chat_template=None, continue_final_message=False, **kwargs):
        """Render `messages` (list of {"role", "content", ...} dicts) with the chat template.

        Returns the prompt string, or its ids when `tokenize=True` (encoded without
        adding bos/eos: the template writes them). Extra keyword arguments, such as
        `thinking=True` for V3.1, are template variables; they override the special
        token variables (bos_token, eos_token, ...) of the same name.
        """
        if messages and isinstance(messages[0], (list, tuple)):
            raise TypeError("apply_chat_template takes one conversation (a list of message dicts); "
                            "call it once per conversation")
        template = self.get_chat_template(chat_template, tools)
        variables = dict(self.special_tokens_map)
        variables.update(kwargs)
        rendered = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, documents=documents,
                                        continue_final_message=continue_final_message, **variables)
        if tokenize:
            return self.encode(rendered, add_special_tokens=False)
        return rendered

    def __repr__(self):
        return "{}({!r}, vocab_size={}, len={})".format(type(self).__name__, self.name_or_path,
                                                         self.vocab_size, len(self))


# --------------------------------------------------------------------------------------
# tokenizer.json (Rust tokenizers)
# --------------------------------------------------------------------------------------
class FastTokenizer(BaseTokenizer):
    """A `tokenizer.json` tokenizer, configured like transformers' fast tokenizers."""

    def __init__(self, folder, config, path=None):
        super().__init__(folder, config)
        from tokenizers import Tokenizer
        llama_like = config.tokenizer_class in _BOS_EOS_TEMPLATE_CLASSES
        if llama_like:
            for name, default in _LLAMA_DEFAULT_SPECIALS.items():
                if self._special[name] is None and name not in config.raw:
                    self._special[name] = default
        path = path or os.path.join(folder, TOKENIZER_JSON)
        try:
            self._tk = Tokenizer.from_file(path)
        except Exception as exc:  # the Rust side raises a bare Exception with serde's message
            raise TokenizerError("cannot load {}: {}".format(path, exc)) from exc
        # transformers disables whatever truncation/padding tokenizer.json carries (and applies
        # its own only on request); encode here never truncates or pads
        self._tk.no_truncation()
        self._tk.no_padding()
        self._tk.encode_special_tokens = config.split_special_tokens
        self._add_configured_tokens()
        # Without a tokenizer_class, explicit add_bos_token/add_eos_token are taken at their word.
        if llama_like or (
                config.tokenizer_class is None
                and (config.add_bos_token is not None or config.add_eos_token is not None)):
            self._install_bos_eos_template()
        if config.raw.get("add_prefix_space") is not None:
            logger.warning("%s: add_prefix_space is ignored (transformers only honours it when converting "
                           "a slow tokenizer)", config.path)

    def _add_configured_tokens(self):
        from tokenizers import AddedToken

        def make(spec, special):
            return AddedToken(spec.content, single_word=spec.single_word, lstrip=spec.lstrip, rstrip=spec.rstrip,
                              normalized=spec.normalized, special=special)

        present = {tok.content for tok in self._tk.get_added_tokens_decoder().values()}
        special_names = set(self.all_special_tokens)
        to_add = []
        # added_tokens_decoder entries the tokenizer.json lacks, in id order like transformers
        for _, spec in sorted(self.config.added_tokens.items()):
            if spec.content not in present:
                to_add.append(make(spec, spec.special or spec.content in special_names))
                present.add(spec.content)
        # special tokens that are not added tokens yet become (non-splittable) special added tokens
        specs = [self.config.special[name] or AddedTokenSpec(token, special=True)
                 for name, token in self._special.items() if token is not None]
        specs += self.config.additional_special_tokens
        for spec in specs:
            if spec.content not in present:
                to_add.append(make(spec, True))
                present.add(spec.content)
        if to_add:
            self._tk.add_tokens(to_add)

    def _install_bos_eos_template(self):
        from tokenizers import processors
        special = []
        for enabled, name in ((self.add_bos_token, "bos_token"), (self.add_eos_token, "eos_token")):
            if not enabled:
                continue
            token = self._special[name]
            if token is None:
                raise TokenizerError("{}: add_{} is true but {} is not set".format(self.config.path, name, name))
            special.append((token, self._special_id(name)))
        bos = self._special["bos_token"] if self.add_bos_token else None
        eos = self._special["eos_token"] if self.add_eos_token else None
        single = " ".join(p for p in (bos and bos + ":0", "$A:0", eos and eos + ":0") if p)
        pair = single + " " + " ".join(p for p in (bos and bos + ":1", "$B:1", eos and eos + ":1") if p)
        self._tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    @property
    def vocab_size(self):
        return self._tk.get_vocab_size(with_added_tokens=False)

    def __len__(self):
        return self._tk.get_vocab_size(with_added_tokens=True)

    def get_vocab(self):
        return self._tk.get_vocab(with_added_tokens=True)

    def _id_to_token(self, token_id):
        return self._tk.id_to_token(token_id) if token_id >= 0 else None

    def _token_to_id(self, token):
        return self._tk.token_to_id(token)

    def encode(self, text, add_special_tokens=True):
        if not isinstance(text, str):
            raise TypeError("encode expects a str, got {}".format(type(text).__name__))
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens=True):
        """Ids of several texts, encoded in parallel by the Rust encoder."""
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def _decode(self, ids, skip_special_tokens):
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------------------
# sentencepiece tokenizer.model
# --------------------------------------------------------------------------------------
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")
_SPACE_MARK = "\u2581"


class SentencePieceTokenizer(BaseTokenizer):
    """A sentencepiece `tokenizer.model`, with the special-token handling of Llama tokenizers."""

    def __init__(self, folder, config, path=None):
        super().__init__(folder, config)
        import sentencepiece
        path = path or os.path.join(folder, SENTENCEPIECE_MODEL)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except Exception as exc:  # sentencepiece raises OSError or RuntimeError depending on the failure
            raise TokenizerError("cannot load sentencepiece model {}: {}".format(path, exc)) from exc
        if config.legacy is False:
            logger.warning("%s: legacy=false is not supported for sentencepiece models; using the legacy "
                           "(per-segment dummy prefix) encoding", config.path)
        self._size = self._sp.GetPieceSize()
        self._pieces = [self._sp.IdToPiece(i) for i in range(self._size)]
        self._byte_values = {}
        for i, piece in enumerate(self._pieces):
            match = _BYTE_PIECE.match(piece) if self._sp.IsByte(i) else None
            if match:
                self._byte_values[i] = int(match.group(1), 16)
        # sentencepiece drops the dummy-prefix space of the first piece when decoding only
        # if the model adds one when encoding; probe instead of parsing the model proto
        probe = self._sp.EncodeAsPieces("a")
        self._strips_leading_space = bool(probe) and probe[0].startswith(_SPACE_MARK)

        self._fill_special_defaults()
        # id -> AddedTokenSpec: tokens cut out of the text before sentencepiece sees it
        self._added = {}
        for i in range(self._size):
            if self._sp.IsControl(i) or self._sp.IsUnknown(i):
                self._added[i] = AddedTokenSpec(self._pieces[i], normalized=False, special=True)
        self._added.update(config.added_tokens)
        specials = set(self.all_special_tokens)
        known = {spec.content for spec in self._added.values()}
        for content in self.all_special_tokens:
            if content in known:
                continue
            # a special token that is an ordinary piece keeps its id; an unknown one gets the next free id
            piece_id = self._sp.PieceToId(content)
            token_id = piece_id if self._pieces[piece_id] == content else len(self)
            self._added[token_id] = AddedTokenSpec(content, normalized=False, special=True)
            known.add(content)
        self._special_ids = {i for i, spec in self._added.items() if spec.special or spec.content in specials}
        self._added_by_content = {spec.content: token_id for token_id, spec in self._added.items()}
        # longest first, so that "<a><b>" is not split into "<a>" when both exist
        contents = sorted(self._added_by_content, key=len, reverse=True)
        self._split_re = re.compile("|".join(re.escape(c) for c in contents)) if contents else None

    def _fill_special_defaults(self):
        # Without a config entry, use the model's own control pieces (as LlamaTokenizer's defaults do).
        # An explicit null in the config keeps the token unset.
        for name, sp_id in (("bos_token", self._sp.bos_id()), ("eos_token", self._sp.eos_id()),
                            ("unk_token", self._sp.unk_id()), ("pad_token", self._sp.pad_id())):
            if self._special[name] is None and name not in self.config.raw and 0 <= sp_id < self._size:
                self._special[name] = self._pieces[sp_id]

    @property
    def vocab_size(self):
        return self._size

    def __len__(self):
        return max([self._size] + [i + 1 for i in self._added])

    def get_vocab(self):
        vocab = {piece: i for i, piece in enumerate(self._pieces)}
        vocab.update(self._added_by_content)
        return vocab

    def _id_to_token(self, token_id):
        spec = self._added.get(token_id)
        if spec is not None:
            return spec.content
        return self._pieces[token_id] if 0 <= token_id < self._size else None

    def _token_to_id(self, token):
        if token in self._added_by_content:
            return self._added_by_content[token]
        token_id = self._sp.PieceToId(token)
        # PieceToId answers unk for unknown pieces, which callers must see as "not found"
        if token_id == self._sp.unk_id() and token != self._pieces[token_id]:
            return None
        return token_id

    def _segments(self, text):
        """(is_added_token_id, str_or_id) pieces of `text`, honouring lstrip/rstrip."""
        if self._split_re is None or self.config.split_special_tokens:
            return [(False, text)]
        out, pos, strip_next = [], 0, False
        for match in self._split_re.finditer(text):
            spec = self._added[self._added_by_content[match.group()]]
            chunk = text[pos:match.start()]
            if strip_next:
                chunk = chunk.lstrip()
            if spec.lstrip:
                chunk = chunk.rstrip()
            out.append((False, chunk))
            out.append((True, self._added_by_content[match.group()]))
            strip_next = spec.rstrip
            pos = match.end()
        tail = text[pos:]
        out.append((False, tail.lstrip() if strip_next else tail))
        return out

    def encode(self, text, add_special_tokens=True):
        if not isinstance(text, str):
            raise TypeError("encode expects a str, got {}".format(type(text).__name__))
        ids = []
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        for is_token, value in self._segments(text):
            if is_token:
                ids.append(value)
            elif value:
                ids.extend(self._sp.EncodeAsIds(value))
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def _decode(self, ids, skip_special_tokens):
        parts, pending = [], bytearray()
        first_piece = True
        for token_id in ids:
            if skip_special_tokens and token_id in self._special_ids:
                continue
            byte = self._byte_values.get(token_id)
            if byte is not None:
                pending.append(byte)
                first_piece = False
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            spec = self._added.get(token_id)
            if spec is not None:
                parts.append(spec.content)
            elif 0 <= token_id < self._size:
                piece = self._pieces[token_id]
                if first_piece and self._strips_leading_space and piece.startswith(_SPACE_MARK):
                    piece = piece[1:]
                parts.append(piece.replace(_SPACE_MARK, " "))
            else:
                raise IndexError("token id {} is out of range for {} (len {})".format(
                    token_id, self.name_or_path, len(self)))
            first_piece = False
        if pending:
            parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
def load_tokenizer(folder):
    """Tokenizer for a model folder: `tokenizer.json` if present, else `tokenizer.model`,
    configured by `tokenizer_config.json` (optional)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise TokenizerNotFoundError("tokenizer folder {} does not exist".format(folder))
    config = TokenizerConfig(folder)
    json_path = os.path.join(folder, TOKENIZER_JSON)
    sp_path = os.path.join(folder, SENTENCEPIECE_MODEL)
    if os.path.isfile(json_path):
        return FastTokenizer(folder, config, json_path)
    if os.path.isfile(sp_path):
        return SentencePieceTokenizer(folder, config, sp_path)
    raise TokenizerNotFoundError("no tokenizer in {}: expected {} (tokenizers format) or {} (sentencepiece)".format(
        folder, TOKENIZER_JSON, SENTENCEPIECE_MODEL))
