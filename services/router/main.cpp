int main() { return 0; }  // placeholder until the router service lands
