from adqueue.cli import main

main()
