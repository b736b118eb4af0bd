"""The demo's last step: ask a running qserve the same questions as the base model and as the adapter,
through the OpenAI client.  python scripts/_demo_client.py BASE_URL ADAPTER_NAME QUESTION..."""
import sys

from openai import OpenAI


def main(url: str, adapter: str, questions: list[str]) -> None:
    client = OpenAI(base_url=url, api_key="unused")
    base = next(m.id for m in client.models.list() if getattr(m, "parent", None) is None)
    for q in questions:
        print(f"\nQ: {q}")
        for model in (base, adapter):
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                   max_tokens=40, temperature=0)
            print(f"  [{model}] {reply.choices[0].message.content.strip()}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
