"""MindSpore Cells of the DeepSeek architecture, one file per concept."""
