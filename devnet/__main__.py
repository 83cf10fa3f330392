from devnet.cli import main

main()
