"""Meta's published Llama 3.1 / 3.2 prompt-format examples, as facts: each input prompt and model response
copied from meta-llama/llama-models, llama_models/llama3_1/prompt_format.md ("3.1") and
models/llama3_2/text_prompt_format.md ("3.2"). The special tokens are spelled out as on those pages."""

SYSTEM_3_1_TOOLS = (
    "Environment: ipython\nTools: brave_search, wolfram_alpha\nCutting Knowledge Date: December 2023\n"
    "Today Date: 21 September 2024\n\nYou are a helpful assistant.\n"
)

WOLFRAM_RESULT = """
{
    "queryresult": {
        "success": true,
        "inputstring": "100th decimal of pi",
        "pods": [
            {
                "title": "Input interpretation",
                "subpods": [
                    {
                        "title": "",
                        "plaintext": "100th digit | \u03c0"
                    }
                ]
            },
            {
                "title": "Nearby digits",
                "subpods": [
                    {
                        "title": "",
                        "plaintext": "...86208998628034825342117067982148086513282306647093..."
                    }
                ]
            },
            {
                "title": "Result",
                "primary": true,
                "subpods": [
                    {
                        "title": "",
                        "plaintext": "7"
                    }
                ]
            }
        ]
    }
}
"""

JSON_FUNCTIONS_3_1 = """Answer the user's question by making use of the following functions if needed.
If none of the function can be used, please say so.
Here is a list of functions in JSON format:
{
    "type": "function",
    "function": {
        "name": "trending_songs",
        "description": "Returns the trending songs on a Music site",
        "parameters": {
            "type": "object",
            "properties": [
                {
                    "n": {
                        "type": "object",
                        "description": "The number of songs to return"
                    }
                },
                {
                    "genre": {
                        "type": "object",
                        "description": "The genre of the songs to return"
                    }
                }
            ],
            "required": ["n"]
        }
    }
}

Return function calls in JSON format."""

FUNCTION_TAG_INSTRUCTIONS_3_1 = """You have access to the following functions:

Use the function 'trending_songs' to 'Returns the trending songs on a Music site':
{"name": "trending_songs", "description": "Returns the trending songs on a Music site", "parameters": {"genre": {"description": "The genre of the songs to return", "param_type": "str", "required": false}, "n": {"description": "The number of songs to return", "param_type": "int", "required": true}}}

Think very carefully before calling functions.
If you choose to call a function ONLY reply in the following format with no prefix or suffix:

<function=example_function_name>{"example_name": "example_value"}</function>

Reminder:
- If looking for real time information use relevant functions before falling back to brave_search
- Function calls MUST follow the specified format, start with <function= and end with </function>
- Required parameters MUST be specified
- Only call one function at a time
- Put the entire function call reply on one line"""  # noqa: E501

SYSTEM_3_1_CUSTOM = (
    "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n\n"
    "You are a helpful assistant.\n"
)

SYSTEM_3_2_FUNCTIONS = """You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the function can be used, point it out. If the given question lacks the parameters required by the function,
also point it out. You should only return the function call in tools call sections.

If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]
You SHOULD NOT include any other text in the response.

Here is a list of functions in JSON format that you can invoke.

[
    {
        "name": "get_weather",
        "description": "Get weather info for places",
        "parameters": {
            "type": "dict",
            "required": [
                "city"
            ],
            "properties": {
                "city": {
                    "type": "string",
                    "description": "The name of the city to get the weather for"
                },
                "metric": {
                    "type": "string",
                    "description": "The metric for weather. Options are: celsius, fahrenheit",
                    "default": "celsius"
                }
            }
        }
    }
]"""  # noqa: E501

BOT, EOT, EOM = "<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>"


def header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


# name -> (input prompt, model response), exactly as published.
EXAMPLES = {
    "3.1 builtin tool call": (
        BOT + header("system") + SYSTEM_3_1_TOOLS + EOT
        + header("user") + "Search the web for the latest price of 1oz gold?" + EOT + header("assistant"),
        '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    ),
    "3.1 code interpreter": (
        BOT + header("system") + "Environment: ipython" + EOT + header("user")
        + "Write code to check if number is prime, use that to see if the number 7 is prime" + EOT
        + header("assistant"),
        "<|python_tag|>def is_prime(n):\n    if n <= 1\n        return False\n"
        "    for i in range(2, int(n**0.5) + 1):\n        if n % i == 0:\n            return False\n"
        "    return True\n\nprint(is_prime(7))  # Output: True<|eom_id|>",
    ),
    "3.1 builtin tools full interaction": (
        BOT + header("system") + "Environment: ipython\nTools: brave_search, wolfram_alpha\n" + EOT
        + header("user") + "What is the 100th decimal of pi?" + EOT
        + header("assistant") + '<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")' + EOM
        + header("ipython") + WOLFRAM_RESULT + EOT + header("assistant"),
        "The 100th decimal of pi is 7.<|eot_id|>",
    ),
    "3.1 JSON tool calling": (
        BOT + header("system") + SYSTEM_3_1_CUSTOM + EOT + header("user") + JSON_FUNCTIONS_3_1 + EOT
        + header("user") + "Use tools to get latest trending songs" + EOT + header("assistant"),
        '<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n'
        '        "n": "10",\n        "genre": "all"\n    }\n}<|eom_id|>',
    ),
    "3.1 <function> tool calling": (
        BOT + header("system") + SYSTEM_3_1_CUSTOM + EOT + header("user") + FUNCTION_TAG_INSTRUCTIONS_3_1 + EOT
        + header("user") + "Use tools to get latest trending songs" + EOT + header("assistant"),
        '<function=trending_songs>{"n": 10}</function><|eot_id|>',
    ),
    "3.2 zero shot function calling": (
        BOT + header("system") + SYSTEM_3_2_FUNCTIONS + EOT
        + header("user") + "What is the weather in SF and Seattle?" + EOT + header("assistant"),
        "[get_weather(city='San Francisco', metric='celsius'), get_weather(city='Seattle', metric='celsius')]"
        "<|eot_id|>",
    ),
    "3.2 zero shot function calling E2E": (
        BOT + header("system") + SYSTEM_3_2_FUNCTIONS + EOT + header("user") + "What is the weather in SF?" + EOT
        + header("assistant") + '<|python_tag|>[get_weather(city="San Francisco", metric="celsius")]' + EOT
        + header("ipython") + '"25 C"' + EOT + header("assistant"),
        "The weather in San Francisco is 25 C.<|eot_id|>",
    ),
    "3.2 code interpreter": (
        BOT + header("system")
        + "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 24 September 2024\n" + EOT
        + header("user") + "Write code to check if number is prime. Use it to verify if number 7 is prime" + EOT
        + header("assistant"),
        "<|python_tag|>def is_prime(n):\n    if n <= 1:\n        return False\n    if n == 2:\n        return True\n"
        "    if n % 2 == 0:\n        return False\n    max_divisor = int(n**0.5) + 1\n"
        "    for d in range(3, max_divisor, 2):\n        if n % d == 0:\n            return False\n    return True\n"
        "\nprint(is_prime(7))  # Output: True<|eom_id|>",
    ),
}

# The responses' tool calls, as Meta's pages describe them (name and arguments).
EXPECTED_CALLS = {
    "3.1 builtin tool call": [{"name": "brave_search", "arguments": {"query": "latest price of 1oz gold"}}],
    "3.1 code interpreter": [{"name": "code_interpreter", "arguments": {"code": EXAMPLES["3.1 code interpreter"][1][
        len("<|python_tag|>"):-len(EOM)]}}],
    "3.1 builtin tools full interaction": None,  # the final answer: plain text
    "3.1 JSON tool calling": [{"name": "trending_songs", "arguments": {"n": "10", "genre": "all"}}],
    "3.1 <function> tool calling": [{"name": "trending_songs", "arguments": {"n": 10}}],
    "3.2 zero shot function calling": [
        {"name": "get_weather", "arguments": {"city": "San Francisco", "metric": "celsius"}},
        {"name": "get_weather", "arguments": {"city": "Seattle", "metric": "celsius"}},
    ],
    "3.2 zero shot function calling E2E": None,
    "3.2 code interpreter": [{"name": "code_interpreter", "arguments": {"code": EXAMPLES["3.2 code interpreter"][1][
        len("<|python_tag|>"):-len(EOM)]}}],
}
