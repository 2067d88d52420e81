"""The `mesh` command: `main` (parser, dispatch), one module per command family
(`services`: run/call/ls/info/stats, `events`: publish/dlq, `mesh`: up/down), and
`_common`, the one module they share (exit codes, help layout, arguments, output, client)."""
