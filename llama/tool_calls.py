"""Llama 3.1+ tool calling: the system lines that offer tools, and the tool calls read out of a reply.

Meta's prompt format (the Llama 3.1 and 3.2 prompt-format pages of meta-llama/llama-models), in short:
- A system message line "Environment: ipython" turns on the code interpreter; "Tools: brave_search,
  wolfram_alpha" offers built-in tools; "Cutting Knowledge Date: ..." and "Today Date: ..." are the
  conventional date lines.
- The model calls a built-in tool with `<|python_tag|>brave_search.call(query="...")<|eom_id|>`, and the code
  interpreter with `<|python_tag|>` + Python code + `<|eom_id|>`: <|eom_id|> (end of message) says that it waits
  for the tool's output, which comes back as an "ipython" message; its final answer ends with <|eot_id|>.
- Custom tools are described in a user message; the model answers with JSON, `{"name": ..., "parameters":
  {...}}`, or with `<function=name>{...json...}</function>`; Llama 3.2 1B/3B write a Python-like list of
  calls, `[f(a=1), g(b="x")]`.

`reply_message` turns a generated reply into the assistant message `Llama.chat_completion` returns: when it
holds a tool call, the message also carries `tool_calls` (name and arguments of each), `python_tag` and
`stop_reason` ("end_of_message" or "end_of_turn"), and its `content` is the call exactly as the model wrote
it, so that ChatFormat re-encodes the turn byte for byte in the next round. Python-like calls are read with
`ast` (parsed, never evaluated): argument values must be literals.
"""

import ast
import json
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, TypedDict

if TYPE_CHECKING:  # llama.tokenizer imports this module
    from llama.completion import Completion
    from llama.tokenizer import Message

END_OF_MESSAGE = "end_of_message"  # the reply ended with <|eom_id|>: the model waits for a tool's output
END_OF_TURN = "end_of_turn"  # the reply ended with <|eot_id|> (or without a stop token)
STOP_REASONS = (END_OF_MESSAGE, END_OF_TURN)
CODE_INTERPRETER = "code_interpreter"  # the name given to code written after <|python_tag|>
TOOL_FIELDS = ("tool_calls", "python_tag", "stop_reason")

_FUNCTION_TAG = re.compile(r"<function=([^>\s]+)>(.*)</function>", re.DOTALL)


class ToolCall(TypedDict):
    name: str  # e.g. "brave_search", "code_interpreter", or a custom function's name
    arguments: Dict[str, Any]  # e.g. {"query": "..."}; {"code": "..."} for the code interpreter


def system_prompt(
    tools: Sequence[str] = (),
    *,
    ipython: bool = True,
    knowledge_date: Optional[str] = None,
    today: Optional[str] = None,
    instructions: Optional[str] = None,
) -> str:
    """The text of a Llama 3.1 system message that offers tools, one line each, as Meta's examples write them:

        Environment: ipython            (ipython=True: turns on the code interpreter)
        Tools: brave_search, wolfram_alpha
        Cutting Knowledge Date: December 2023
        Today Date: 21 September 2024

        You are a helpful assistant.    (instructions, after an empty line)

    Raises ValueError for a tool name that is not a Python identifier (the model calls it as `name.call(...)`).
    """
    bad = [name for name in tools if not (isinstance(name, str) and name.isidentifier())]
    if bad:
        raise ValueError(f"tool names must be Python identifiers such as 'brave_search', got {bad}")
    lines = ["Environment: ipython"] if ipython else []
    if tools:
        lines.append("Tools: " + ", ".join(tools))
    if knowledge_date:
        lines.append(f"Cutting Knowledge Date: {knowledge_date}")
    if today:
        lines.append(f"Today Date: {today}")
    text = "\n".join(lines)
    if instructions:
        text = f"{text}\n\n{instructions}" if text else instructions
    return text


def parse_tool_calls(text: str, python_tag: bool = False) -> Optional[List[ToolCall]]:
    """The tool calls in a reply's text (without <|python_tag|>), or None if it holds none.

    Tried in order: `<function=name>{json}</function>`; a JSON object with "name" and "parameters"; a Python-like
    list of calls `[f(a=1), g(b="x")]`; a built-in call `tool.call(query="...")`. A reply that began with
    <|python_tag|> and is none of these is code for the interpreter: [{"name": "code_interpreter",
    "arguments": {"code": text}}].
    """
    body = text.strip()
    for parse in (_function_tag_call, _json_call, _python_list_calls, _builtin_call):
        calls = parse(body)
        if calls:
            return calls
    if python_tag:
        return [{"name": CODE_INTERPRETER, "arguments": {"code": text}}]
    return None


def reply_message(completion: "Completion", special_tokens: Dict[str, int]) -> "Message":
    """The assistant message for a generated reply: {"role": "assistant", "content": text}, plus, when the
    reply holds a tool call or ended with <|eom_id|>, "tool_calls", "python_tag" and "stop_reason".

    `special_tokens`: the tokenizer's; without <|python_tag|> (Llama 2) the reply is always plain text.
    """
    message: Dict[str, Any] = {"role": "assistant", "content": completion.text}
    python_tag_id = special_tokens.get("<|python_tag|>")
    if python_tag_id is None:
        return message  # type: ignore[return-value]
    python_tag = completion.tokens[:1] == [python_tag_id] and completion.text.startswith("<|python_tag|>")
    text = completion.text[len("<|python_tag|>"):] if python_tag else completion.text
    eom = completion.stop_token is not None and completion.stop_token == special_tokens.get("<|eom_id|>")
    calls = parse_tool_calls(text, python_tag)
    if calls is None and not eom:
        return message  # type: ignore[return-value]
    message.update(
        content=text,
        tool_calls=calls or [],
        python_tag=python_tag,
        stop_reason=END_OF_MESSAGE if eom else END_OF_TURN,
    )
    return message  # type: ignore[return-value]


def check_tool_fields(message: Dict[str, Any], index: int) -> None:
    """Raise ValueError unless the tool-call fields of message `index`, if any, are well formed and on an
    assistant message."""
    present = [key for key in TOOL_FIELDS if key in message]
    if not present:
        return
    if message.get("role") != "assistant":
        raise ValueError(f"message {index}: only assistant messages carry {present}, not {message.get('role')!r}")
    if "python_tag" in message and not isinstance(message["python_tag"], bool):
        raise ValueError(f"message {index}: 'python_tag' must be True or False, got {message['python_tag']!r}")
    if "stop_reason" in message and message["stop_reason"] not in STOP_REASONS:
        raise ValueError(
            f"message {index}: 'stop_reason' must be one of {list(STOP_REASONS)}, got {message['stop_reason']!r}"
        )
    calls = message.get("tool_calls", [])
    if not isinstance(calls, list) or not all(
        isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict) for c in calls
    ):
        raise ValueError(
            f"message {index}: 'tool_calls' must be a list of {{'name': str, 'arguments': dict}}, got {calls!r:.80}"
        )


# ---- The call forms ----------------------------------------------------------------------------------------


def _function_tag_call(body: str) -> Optional[List[ToolCall]]:
    """`<function=name>{"a": 1}</function>`."""
    match = _FUNCTION_TAG.fullmatch(body)
    if not match:
        return None
    arguments = _json_object(match.group(2))
    return None if arguments is None else [{"name": match.group(1), "arguments": arguments}]


def _json_call(body: str) -> Optional[List[ToolCall]]:
    """`{"name": "f", "parameters": {...}}` (Meta's examples may add "type": "function")."""
    call = _json_object(body)
    if call is None or not isinstance(call.get("name"), str) or not isinstance(call.get("parameters"), dict):
        return None
    return [{"name": call["name"], "arguments": call["parameters"]}]


def _python_list_calls(body: str) -> Optional[List[ToolCall]]:
    """Llama 3.2's `[f(a=1), g(b="x")]`: a non-empty list of calls with keyword arguments only."""
    tree = _parse_expression(body)
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call):
            return None
        name = _dotted_name(node.func)
        arguments = _keyword_literals(node)
        if name is None or arguments is None:
            return None
        calls.append({"name": name, "arguments": arguments})
    return calls


def _builtin_call(body: str) -> Optional[List[ToolCall]]:
    """A built-in tool's `brave_search.call(query="...")`."""
    tree = _parse_expression(body)
    if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Attribute) or tree.func.attr != "call":
        return None
    if not isinstance(tree.func.value, ast.Name):
        return None
    arguments = _keyword_literals(tree)
    return None if arguments is None else [{"name": tree.func.value.id, "arguments": arguments}]


def _json_object(text: str) -> Optional[Dict[str, Any]]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _parse_expression(text: str) -> Optional[ast.expr]:
    """`text` parsed as one Python expression (never run), or None."""
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _dotted_name(node: ast.expr) -> Optional[str]:
    """`f` or `a.b.f` as a string; None for any other callee."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _keyword_literals(call: ast.Call) -> Optional[Dict[str, Any]]:
    """A call's keyword arguments as Python values, or None if it has positional or `**` arguments or a value
    that is not a literal."""
    if call.args or any(keyword.arg is None for keyword in call.keywords):
        return None
    arguments = {}
    for keyword in call.keywords:
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None
    return arguments
