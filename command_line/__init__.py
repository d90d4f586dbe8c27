"""
What both scripts share about the command line: fields declared with their bounds (`fields`), the strict parser, the
flags that must hold no token and the one-line error exit (`parsing`), and flag files with overrides (`flag_files`).
"""
