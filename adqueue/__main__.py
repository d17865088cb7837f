from adqueue.launcher import main

main()
