"""Exercise 10 · Parsing a Llama 3.1 tool call (09_tools.py `parse_tool_call`; Llama 3 §4.3.5 and
Meta's Llama 3.1 prompt-format page).

A Llama 3.1 assistant message is either a final answer (plain text) or a call, in one of these forms:

    <|python_tag|>brave_search.call(query="...")            a built-in tool: brave_search or wolfram_alpha,
                                                            arguments as Python keywords with string values
    <|python_tag|>{"name": "NAME", "parameters": {...}}     a custom tool, as JSON
    <function=NAME>{"arg": "value"}</function>              a custom tool, the other documented form
    <|python_tag|>any Python source                         code for the interpreter: "code_interpreter"

Return (tool name, arguments dict) for a call: ("code_interpreter", {"code": source}) for code;
None for a final answer. Raise ValueError for a call that is broken: a <function=...> without its
</function>, or arguments that are not a JSON object. Python's `json` and `ast` modules help.

    pytest tutorials/exercises -k tool
"""
import ast
import json
import re


def parse_tool_call(text):
    """One assistant message -> (name, arguments) for a call, None for a final answer; ValueError if broken."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code
