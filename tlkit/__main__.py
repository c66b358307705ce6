from tlkit.cli import main

main()
