"""Agent programs written as users write them, trained through palaestra's endpoint (agent.program=...)."""

from __future__ import annotations

import time
from typing import TypedDict


def openai_agent(example, client) -> str:
    """The OpenAI SDK: a draft, then a final answer that sees the draft."""
    messages = [{"role": "user", "content": example.question}]
    draft = client.chat.completions.create(model="policy", messages=messages, max_tokens=8)
    messages += [{"role": "assistant", "content": draft.choices[0].message.content},
                 {"role": "user", "content": "Now give only the final number."}]
    final = client.chat.completions.create(model="policy", messages=messages, max_tokens=8, stop=["\n"])
    return final.choices[0].message.content


class _State(TypedDict):
    question: str
    notes: str
    answer: str


def langgraph_agent(example, client) -> str:
    """A LangGraph graph of two LangChain ChatOpenAI nodes against the episode's endpoint."""
    from langchain_openai import ChatOpenAI
    from langgraph.graph import END, START, StateGraph

    llm = ChatOpenAI(base_url=str(client.base_url), api_key=client.api_key, model="policy", max_tokens=8, max_retries=0)

    def think(state: _State) -> dict:
        return {"notes": llm.invoke(f"Think about: {state['question']}").content}

    def answer(state: _State) -> dict:
        return {"answer": llm.invoke(f"{state['question']}\nNotes: {state['notes']}\nAnswer:").content}

    graph = StateGraph(_State)
    graph.add_node("think", think)
    graph.add_node("answer", answer)
    graph.add_edge(START, "think")
    graph.add_edge("think", "answer")
    graph.add_edge("answer", END)
    return graph.compile().invoke({"question": example.question, "notes": "", "answer": ""})["answer"]


def reward_agent(example, client) -> float:
    """Returns its own reward: 1 when the reply holds a digit."""
    reply = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": example.question}])
    return float(any(ch.isdigit() for ch in reply.choices[0].message.content))


def silent_agent(example, client) -> str:
    """Never calls the endpoint."""
    return "42"


def raising_agent(example, client) -> str:
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": example.question}])
    raise RuntimeError("the agent's own bug")


def none_agent(example, client):
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": example.question}])
    return None


def slow_agent(example, client) -> str:
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": example.question}])
    time.sleep(30)
    return "late"


def one_argument(example) -> str:
    """Forgets the client: a one-line error at start."""
    return example.question
