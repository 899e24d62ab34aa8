from vault_edge.cli.entry import main

main()
