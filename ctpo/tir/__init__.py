"""Tool-integrated reasoning: sandbox, turn protocol, episode loop."""
