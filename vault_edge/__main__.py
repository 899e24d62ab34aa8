from vault_edge.cli.main import main

main()
