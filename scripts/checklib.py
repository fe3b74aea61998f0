"""The pass/fail bookkeeping the client checks (openai_client_check.py,
ollama_client_check.py) share: run every check, report each, fail at the end."""

PASSED, FAILED = [], []


def check(name, fn):
    try:
        fn()
    except Exception as e:  # report every check, then fail at the end
        FAILED.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}")
    else:
        PASSED.append(name)
        print(f"ok   {name}")


def summary():
    """Print the counts; the exit status (1 if any check failed)."""
    print(f"{len(PASSED)} passed, {len(FAILED)} failed")
    return 1 if FAILED else 0
