"""vLLama: several vLLM servers on one box behind the Ollama and OpenAI APIs."""

__version__ = "0.1.0"
