# Loads a Vagrantfile with a recording stand-in for Vagrant's configuration API and prints,
# for each machine in definition order, its private address and its shell provisioners:
#
#   sync <host path> <guest path>          (synced folders of the whole configuration)
#   machine <name> <private ip>
#   provision <name> <provisioner name> <inline command>
#
# deploy/test.sh runs the printed commands with --root to check what each VM would get.
# Only the parts of the API the lab's Vagrantfile uses are modelled; anything else is an
# error, so the test notices when the Vagrantfile grows beyond what it checks.

class Recorder
  attr_reader :calls

  def initialize(path)
    @path = path
    @calls = []
  end

  def method_missing(name, *args, **kwargs, &block)
    @calls << [name, args, kwargs]
    child = Recorder.new("#{@path}.#{name}")
    block&.call(child)
    child
  end

  def respond_to_missing?(*)
    true
  end
end

class VmConfig
  attr_reader :machines, :provisioners, :networks, :hostname, :synced

  def initialize
    @machines = []
    @provisioners = []
    @networks = []
    @synced = []
  end

  def box=(value); end
  def hostname=(value)
    @hostname = value
  end

  def synced_folder(host_path, guest_path, **options)
    @synced << [host_path, guest_path] unless options[:disabled]
  end

  def provider(_name)
    yield Recorder.new("provider")
  end

  def network(kind, **options)
    @networks << [kind, options]
  end

  def provision(name, type:, inline:)
    raise "provisioner #{name}: only shell provisioners are modelled" unless type == "shell"
    @provisioners << [name, inline]
  end

  def define(name)
    machine = MachineConfig.new
    yield machine
    @machines << [name, machine]
  end
end

class MachineConfig
  attr_reader :vm

  def initialize
    @vm = VmConfig.new
  end
end

module Vagrant
  @root = MachineConfig.new

  def self.root
    @root
  end

  def self.configure(version)
    raise "unexpected config version #{version}" unless version == "2"
    yield @root
  end
end

path = ARGV.fetch(0)
eval(File.read(path), binding, path) # rubocop:disable Security/Eval

root = Vagrant.root.vm
raise "provisioners outside a machine are not modelled" unless root.provisioners.empty?
root.synced.each { |host_path, guest_path| puts "sync #{host_path} #{guest_path}" }
root.machines.each do |name, machine|
  private_ips = machine.vm.networks.select { |kind, _| kind == "private_network" }.map { |_, o| o[:ip] }
  raise "#{name}: expected one private network, got #{private_ips.inspect}" unless private_ips.size == 1
  raise "#{name}: per-machine synced folders are not modelled" unless machine.vm.synced.empty?
  raise "#{name}: hostname #{machine.vm.hostname.inspect} differs from the machine name" unless machine.vm.hostname == name
  puts "machine #{name} #{private_ips.first}"
  machine.vm.provisioners.each do |pname, inline|
    raise "#{name}/#{pname}: multi-line inline commands are not modelled" if inline.include?("\n")
    puts "provision #{name} #{pname} #{inline}"
  end
end
